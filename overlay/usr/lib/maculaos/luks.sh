# shellcheck shell=sh
# MaculaOS: the data partition's LUKS2 volume (maculaos_device.encryption): make, unlock, crypto-erase.
# Sourced, after /usr/share/maculaos/paths.sh and encryption.sh, by the initrd's /init (from the profile layer)
# and by `maculaos install`. Every key source has a key slot and a token {"type":"maculaos-<source>",
# "keyslots":["<n>"]} in the header, so a volume is unlocked from its header alone, sources in token order.
# Keys pass through files in tmpfs (0600) and are removed as soon as cryptsetup has read them.

luks_say() { echo "maculaos-luks: $*" >&2; }

# "<keyslot> <source> <label>" for each MaculaOS token of volume $1, in token order. The header is read off a
# disk anyone may have written: every field is cut to the characters it may hold.
luks_sources() {
  i=0
  while [ "$i" -lt "$MACULAOS_LUKS_MAX_TOKENS" ]; do
    if json=$(cryptsetup token export --token-id "$i" "$1" 2>/dev/null); then
      src=$(echo "$json" | sed -n 's/.*"type":"maculaos-\([a-z]*\)".*/\1/p')
      slot=$(echo "$json" | sed -n 's/.*"keyslots":\["\([0-9]\{1,2\}\)"\].*/\1/p')
      label=$(echo "$json" | sed -n 's/.*"label":"\([A-Z0-9_]\{1,11\}\)".*/\1/p')
      case " $MACULAOS_LUKS_SOURCES " in
        *" $src "*) [ -n "$src" ] && [ -n "$slot" ] && echo "$slot $src ${label:--}" ;;
      esac
    fi
    i=$((i + 1))
  done
}

# The data cipher of volume $1, if it is one MaculaOS makes.
luks_cipher() {
  c=$(cryptsetup luksDump "$1" 2>/dev/null | sed -n 's/^[[:space:]]*cipher:[[:space:]]*//p' | head -n 1)
  case " $MACULAOS_LUKS_CIPHERS " in *" $c "*) echo "$c" ;; *) return 1 ;; esac
}

# One line typed on any of the kernel's consoles (serial and screen), not echoed; prompt $1. The first console
# answered wins; the other prompts are taken back.
luks_ask() {
  fifo=$MACULAOS_RUN/luks-ask
  rm -f "$fifo" && mkfifo -m 0600 "$fifo" || return 1
  ttys='' pids=''
  # shellcheck disable=SC2013  # one console name per word
  for t in $(cat /sys/class/tty/console/active 2>/dev/null); do
    [ -c "/dev/$t" ] || continue
    ttys="$ttys $t"
    (
      exec <"/dev/$t" >"/dev/$t" 2>&1
      stty -echo 2>/dev/null
      printf '%s' "$1"
      IFS= read -r line && printf '%s\n' "$line" >"$fifo"
      stty echo 2>/dev/null
      echo
    ) </dev/null >/dev/null 2>&1 &
    pids="$pids $!"
  done
  [ -n "$pids" ] || { rm -f "$fifo"; luks_say "no console to ask on"; return 1; }
  IFS= read -r answer <"$fifo"
  # shellcheck disable=SC2086  # one pid per word
  kill $pids 2>/dev/null
  for t in $ttys; do stty echo <"/dev/$t" 2>/dev/null; done
  rm -f "$fifo"
  printf '%s' "$answer"
}

# Wait up to MACULAOS_LUKS_USB_WAIT seconds for the filesystem labelled $1; print its device.
luks_find_label() {
  n=0
  while [ "$n" -lt $((MACULAOS_LUKS_USB_WAIT * 4)) ]; do
    findfs "LABEL=$1" 2>/dev/null && return 0
    n=$((n + 1)); sleep 0.25
  done
  return 1
}

# Mount the disk labelled $1 at $mnt, options $2 (ro or rw); its device in $disk.
luks_mount_key_disk() {
  disk=$(luks_find_label "$1") || return 1
  mnt=$MACULAOS_RUN/luks-key
  mkdir -p "$mnt" && mount -o "$2,nosuid,nodev,noexec" "$disk" "$mnt"
}

# Open volume $1 with key slot $2 from the key file on the disk labelled $3 (mounted read-only meanwhile).
luks_open_usb() {
  luks_mount_key_disk "$3" ro || { luks_say "no disk labelled $3: trying the next key source"; return 1; }
  rc=1
  if [ -f "$mnt/$MACULAOS_LUKS_USB_KEY_FILE" ] && cryptsetup open --key-slot "$2" \
       --keyfile-size "$MACULAOS_LUKS_KEY_BYTES" --key-file "$mnt/$MACULAOS_LUKS_USB_KEY_FILE" "$1" "$MACULAOS_LUKS_MAPPER"
  then
    luks_say "unlocked with the key on $disk ($3)"; rc=0
  else
    luks_say "the key on $disk ($3) does not open this disk"
  fi
  umount "$mnt"
  return $rc
}

# Open volume $1 with key slot $2 from a passphrase asked on the consoles, MACULAOS_LUKS_TRIES times at most.
luks_open_passphrase() {
  n=1
  while [ "$n" -le "$MACULAOS_LUKS_TRIES" ]; do
    pass=$(luks_ask "Passphrase for the data partition ($n/$MACULAOS_LUKS_TRIES): ") || return 1
    if printf '%s' "$pass" | cryptsetup open --key-slot "$2" --key-file - "$1" "$MACULAOS_LUKS_MAPPER" 2>/dev/null
    then
      pass=''; luks_say "unlocked with the passphrase"; return 0
    fi
    pass=''
    luks_say "wrong passphrase"
    n=$((n + 1))
  done
  return 1
}

# Unlock volume $1 as /dev/mapper/$MACULAOS_LUKS_MAPPER with the first key source, in token order, that opens it.
luks_unlock() {
  sources=$(luks_sources "$1")
  [ -n "$sources" ] || { luks_say "$1 has no MaculaOS key slot"; return 1; }
  while read -r slot src label; do
    case "$src" in
      usb) luks_open_usb "$1" "$slot" "$label" && return 0 ;;
      passphrase) luks_open_passphrase "$1" "$slot" && return 0 ;;
    esac
  done <<EOF
$sources
EOF
  return 1
}

# The key of the disk labelled $1 into file $2: the key file there, made (random) when it has none.
luks_usb_key() {
  luks_mount_key_disk "$1" rw || { luks_say "no disk labelled $1 for the usb key source"; return 1; }
  key=$mnt/$MACULAOS_LUKS_USB_KEY_FILE
  rc=0
  if [ ! -s "$key" ]; then
    mkdir -p "${key%/*}" && head -c "$MACULAOS_LUKS_KEY_BYTES" /dev/urandom >"$key.new" && mv "$key.new" "$key" \
      && sync && luks_say "made a new key on $disk ($1)" || rc=1
  fi
  [ $rc -eq 0 ] && head -c "$MACULAOS_LUKS_KEY_BYTES" "$key" >"$2" || rc=1
  [ "$(wc -c <"$2")" -eq "$MACULAOS_LUKS_KEY_BYTES" ] || { luks_say "the key on $disk ($1) is too short"; rc=1; }
  umount "$mnt"
  return $rc
}

# A new passphrase into file $1: from the file MACULAOS_LUKS_PASSPHRASE_FILE (the installer's), else asked twice
# on the consoles.
luks_new_passphrase() {
  if [ -n "${MACULAOS_LUKS_PASSPHRASE_FILE:-}" ]; then
    cp "$MACULAOS_LUKS_PASSPHRASE_FILE" "$1"; return
  fi
  while :; do
    pass=$(luks_ask "Choose the passphrase for the data partition (8 to 256 characters): ") || return 1
    case ${#pass} in [0-7]) luks_say "too short"; continue ;; esac
    again=$(luks_ask "Type it again: ") || return 1
    [ "$pass" = "$again" ] && break
    luks_say "the two differ: again"
  done
  printf '%s' "$pass" >"$1"
  pass='' again=''
}

# Make volume $1 anew (a fresh random volume key; whatever it held is gone), cipher $2, key disk label $3, key
# sources $4... in unlock order; open it and make its ext4. Every source's key is gathered before the disk is
# touched: a missing key disk or a passphrase not given leaves the volume as it was.
luks_create() {
  luks_make new "$@"
}

# Crypto-erase volume $1 (closed): its key slots are wiped, so what it held can never be read again, and a new
# volume is made with the same cipher and key sources (the key disk's key is kept, a new passphrase asked for).
luks_recreate() {
  sources=$(luks_sources "$1")
  [ -n "$sources" ] || { luks_say "$1 has no MaculaOS key slot"; return 1; }
  cipher=$(luks_cipher "$1") || { luks_say "$1 has no cipher MaculaOS makes"; return 1; }
  label=$(echo "$sources" | awk '$2 == "usb" { print $3; exit }')
  # shellcheck disable=SC2046  # one source per word
  luks_make erase "$1" "$cipher" "${label:-$MACULAOS_LUKS_USB_LABEL}" $(echo "$sources" | cut -d' ' -f2)
}

# luks_make new|erase DEV CIPHER LABEL SOURCE...
luks_make() {
  how=$1 dev=$2 cipher=$3 label=$4
  shift 4
  case " $MACULAOS_LUKS_CIPHERS " in *" $cipher "*) ;; *) luks_say "unknown cipher $cipher"; return 1 ;; esac
  echo "$label" | grep -Eqx "$MACULAOS_LUKS_USB_LABEL_RE" || { luks_say "invalid key disk label $label"; return 1; }
  [ $# -gt 0 ] || { luks_say "no key source"; return 1; }
  keys=$MACULAOS_RUN/luks-keys
  rm -rf "$keys" && mkdir -m 0700 "$keys" || return 1
  rc=0
  luks_gather "$label" "$@" || rc=1
  if [ $rc -eq 0 ] && [ "$how" = erase ]; then
    cryptsetup erase --batch-mode "$dev" || rc=1
  fi
  [ $rc -eq 0 ] && { luks_format "$dev" "$cipher" "$label" "$@" || rc=1; }
  rm -rf "$keys"
  [ $rc -eq 0 ] && luks_say "made an encrypted data partition on $dev ($cipher; key sources: $*)"
  return $rc
}

# Each source's key into $keys/<its key slot>.
luks_gather() {
  label=$1 slot=0
  shift
  for src in "$@"; do
    case "$src" in
      usb) luks_usb_key "$label" "$keys/$slot" || return 1 ;;
      passphrase) luks_new_passphrase "$keys/$slot" || return 1 ;;
      *) luks_say "unknown key source $src"; return 1 ;;
    esac
    slot=$((slot + 1))
  done
}

# The volume from the gathered keys: header, a key slot and a token per source, then opened, with an ext4.
luks_format() {
  dev=$1 cipher=$2 label=$3 slot=0
  shift 3
  size=512
  [ "$cipher" = aes-xts-plain64 ] || size=256
  for src in "$@"; do
    kdf="--pbkdf argon2id"
    [ "$src" = usb ] && kdf="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"  # 512 random bits: nothing to stretch
    if [ $slot -eq 0 ]; then
      # shellcheck disable=SC2086  # the options are words
      cryptsetup luksFormat --batch-mode --type luks2 --cipher "$cipher" --key-size $size --label MACULA_DATA \
        --key-slot 0 $kdf --key-file "$keys/0" "$dev" || return 1
    else
      # shellcheck disable=SC2086
      cryptsetup luksAddKey --batch-mode --key-slot "$slot" --key-file "$keys/0" $kdf "$dev" "$keys/$slot" \
        || return 1
    fi
    extra=''
    [ "$src" = usb ] && extra=",\"label\":\"$label\""
    printf '{"type":"maculaos-%s","keyslots":["%s"]%s}' "$src" "$slot" "$extra" \
      | cryptsetup token import --token-id "$slot" --json-file - "$dev" >/dev/null || return 1
    slot=$((slot + 1))
  done
  cryptsetup open --key-file "$keys/0" "$dev" "$MACULAOS_LUKS_MAPPER" \
    && /sbin/mkfs.ext4 -q -L MACULA_DATA "/dev/mapper/$MACULAOS_LUKS_MAPPER"
}
