#!/bin/sh
# Serve a root shell without echo on the virtio test console; the host frames every command's
# output and exit code itself (tests/qemu/machine.py).
port=/dev/hvc0
while :; do
  if [ -c $port ]; then
    stty -F $port raw -echo 2>/dev/null
    /bin/sh < $port > $port 2>&1
  fi
  sleep 1
done
