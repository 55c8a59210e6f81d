# shellcheck shell=sh
# Login banner: logo plus version, only for interactive shells.
case $- in *i*) ;; *) return 0 2>/dev/null || exit 0 ;; esac
if [ -r /etc/os-release ]; then
  . /etc/os-release
  cat /etc/macula/logo.txt 2>/dev/null
  printf '                   %s (%s)\n\n' "$PRETTY_NAME" "${MACULAOS_ARCH:-$(uname -m)}"
fi
