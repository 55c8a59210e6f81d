# shellcheck shell=sh
# MaculaOS: no core dumps from login shells either (see /etc/security/limits.d/maculaos.conf)
# shellcheck disable=SC3045  # dash's ulimit has -c
ulimit -c 0
