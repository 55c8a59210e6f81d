#!/bin/sh
# Serve a root shell without echo on the virtio test console; the host frames every command's
# output and exit code itself (maculaos_sdk.machine, builder/machine.py). stty must act on the open port: settings
# made through a separate open are reset when that open is closed. stderr goes to /dev/null so the
# shell is not interactive: it then dies on SIGTERM at shutdown instead of stalling it.
port=/dev/hvc0
while :; do
  if [ -c $port ]; then
    ( exec 0<>$port 1>&0 2>/dev/null; stty raw -echo; PS1='' PS2='' exec /bin/sh )
  fi
  sleep 1
done
