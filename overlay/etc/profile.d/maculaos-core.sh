# MaculaOS: no core dumps from login shells either (see /etc/security/limits.d/maculaos.conf)
ulimit -c 0
