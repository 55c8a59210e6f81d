# shellcheck shell=sh
# MaculaOS: the data partition's LUKS2 volume (maculaos_device.encryption): make, unlock, crypto-erase.
# Sourced, after /usr/share/maculaos/paths.sh and encryption.sh, by the initrd's /init (from the profile layer)
# and by `maculaos install`. POSIX sh has no local variables: the functions a caller uses (luks_unlock,
# luks_create, luks_recreate, luks_tpm_enroll) run in a subshell, so the caller's own (its boot `slot`, say) stay
# its own; what they leave behind is the opened volume and files. Inside them, names are shared (rc, w, json, ...):
# a function sets its result after the calls it makes, not before. Every key source has a key slot and a token
# {"type":"maculaos-<source>","keyslots":["<n>"]} in the header, so a volume is unlocked from its header alone,
# sources in token order.
# Keys pass through files in tmpfs (0600) and are removed as soon as cryptsetup has read them.

luks_say() { echo "maculaos-luks: $*" >&2; }

# "<keyslot> <source> <label> <token>" for each MaculaOS token of volume $1, in unlock order: by the token's rank
# (its source's place in the configured list; a key sealed anew keeps its rank, not its token id), then token id.
# label: the key disk's for usb, the boot slot a key is sealed for for tpm, else -. The header is read off a disk
# anyone may have written: every field is cut to the characters it may hold.
luks_sources() {
  i=0
  while [ "$i" -lt "$MACULAOS_LUKS_MAX_TOKENS" ]; do
    if json=$(cryptsetup token export --token-id "$i" "$1" 2>/dev/null); then
      src=$(echo "$json" | sed -n 's/.*"type":"maculaos-\([a-z]*\)".*/\1/p')
      slot=$(echo "$json" | sed -n 's/.*"keyslots":\["\([0-9]\{1,2\}\)"\].*/\1/p')
      label=$(echo "$json" | sed -n 's/.*"label":"\([A-Z0-9_]\{1,11\}\)".*/\1/p')
      [ "$src" = tpm ] && label=$(echo "$json" | sed -n 's/.*"boot":"\([AB]\)".*/\1/p')
      case " $MACULAOS_LUKS_SOURCES " in
        *" $src "*) [ -n "$src" ] && [ -n "$slot" ] && echo "$(luks_rank "$json" "$i") $slot $src ${label:--} $i" ;;
      esac
    fi
    i=$((i + 1))
  done | sort -n -k1,1 -k5,5 | cut -d' ' -f2-
}

# The rank of token JSON $1 (token id $2 when it has none: a volume made before ranks).
luks_rank() {
  rank=$(echo "$1" | sed -n 's/.*"rank":\([0-9]\{1,2\}\)[,}].*/\1/p')
  echo "${rank:-$2}"
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
       --keyfile-size "$MACULAOS_LUKS_KEY_BYTES" --key-file "$mnt/$MACULAOS_LUKS_USB_KEY_FILE" \
       "$1" "$MACULAOS_LUKS_MAPPER"
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

# The TPM tools (one binary, a subcommand each) on the kernel's resource manager: the objects a run loads are
# flushed when it ends. MACULAOS_LUKS_TPM_TCTI: another TPM (the unit tests' swtpm), with no resource manager:
# the objects each run leaves are flushed after it (what it saved as context files stays loadable).
luks_tpm() {
  [ -n "${MACULAOS_LUKS_TPM_TCTI:-}" ] || { TPM2TOOLS_TCTI=device:/dev/tpmrm0 tpm2 "$@"; return; }
  TPM2TOOLS_TCTI=$MACULAOS_LUKS_TPM_TCTI tpm2 "$@"
  set -- $?
  for what in -t -l -s; do TPM2TOOLS_TCTI=$MACULAOS_LUKS_TPM_TCTI tpm2 flushcontext "$what" >/dev/null 2>&1; done
  return "$1"
}

# Is there a TPM to use?
luks_have_tpm() { [ -n "${MACULAOS_LUKS_TPM_TCTI:-}" ] || [ -c /dev/tpmrm0 ]; }

# A fresh work folder (tmpfs, 0700) in $w.
luks_tpm_work() {
  w=$MACULAOS_RUN/luks-tpm
  rm -rf "$w" && mkdir -m 0700 "$w"
}

# Seal key file $1 to this TPM under the PCRs $4 (a tpm2 selection; MACULAOS_LUKS_TPM_PCRS when empty), their
# values from file $2 (those a slot will boot with, predicted by maculaos_device.measured_boot), or this boot's
# when $2 is empty; the sealed object into $3.pub and $3.priv. Only the PCR policy releases it: no password, not
# the owner's (adminwithpolicy).
luks_tpm_seal() {
  luks_have_tpm || { luks_say "no TPM (/dev/tpmrm0) for the tpm key source"; return 1; }
  luks_tpm_work || return 1
  rc=1
  luks_tpm createpolicy --policy-pcr -l "${4:-$MACULAOS_LUKS_TPM_PCRS}" ${2:+-f "$2"} -L "$w/policy" >/dev/null \
    && luks_tpm createprimary -C o -g sha256 -G ecc -c "$w/primary" >/dev/null \
    && luks_tpm create -C "$w/primary" -g sha256 -L "$w/policy" -a 'fixedtpm|fixedparent|adminwithpolicy|noda' \
         -i "$1" -u "$3.pub" -r "$3.priv" >/dev/null \
    && rc=0
  rm -rf "$w"
  return $rc
}

# The PCR selection tpm token JSON $1 is sealed to (a token without one: MACULAOS_LUKS_TPM_PCRS).
luks_tpm_pcrs() {
  pcrs=$(echo "$1" | sed -n 's/.*"pcrs":"\([a-z0-9:,]\{1,40\}\)".*/\1/p')
  [ -n "$pcrs" ] || pcrs=$MACULAOS_LUKS_TPM_PCRS
  echo "$pcrs" | grep -Eqx "$MACULAOS_LUKS_TPM_PCR_LIST_RE" || return 1
  echo "$pcrs"
}

# Unseal the key of tpm token $2 of volume $1 into file $3 (this TPM, this boot's PCRs).
luks_tpm_unseal() {
  luks_have_tpm || { luks_say "no TPM (/dev/tpmrm0)"; return 1; }
  luks_tpm_work || return 1
  json=$(cryptsetup token export --token-id "$2" "$1" 2>/dev/null) && pcrs=$(luks_tpm_pcrs "$json") || return 1
  echo "$json" | sed -n 's/.*"pub":"\([A-Za-z0-9+/=]*\)".*/\1/p' | head -c 4096 | base64 -d >"$w/seal.pub" 2>/dev/null
  echo "$json" | sed -n 's/.*"priv":"\([A-Za-z0-9+/=]*\)".*/\1/p' | head -c 4096 | base64 -d >"$w/seal.priv" 2>/dev/null
  rc=1
  luks_tpm createprimary -C o -g sha256 -G ecc -c "$w/primary" >/dev/null 2>&1 \
    && luks_tpm load -C "$w/primary" -u "$w/seal.pub" -r "$w/seal.priv" -c "$w/seal" >/dev/null 2>&1 \
    && luks_tpm unseal -c "$w/seal" -p "pcr:$pcrs" -o "$3" 2>/dev/null && rc=0
  rm -rf "$w"
  return $rc
}

# The network key source: a key encrypted to a Tang server (the McCallum-Relyea exchange, as clevis's tang pin does
# it, in its JWE format: `clevis decrypt` opens it too), with jose. The server never sees the key, and the exchange
# needs no TLS: the advertisement is trusted through the thumbprint of a key that signed it (the node config's),
# and what the node sends is blinded by a key it makes for the one request.

# wget: busybox's in the initrd and on the node, or the host's (unit tests); both take these options.
luks_wget() {
  if command -v wget >/dev/null 2>&1; then wget "$@"; else busybox wget "$@"; fi
}

# The body of an HTTP GET of URL $1 (a POST of JWK $3 when given) into file $2: at most MACULAOS_LUKS_HTTP_MAX bytes,
# MACULAOS_LUKS_HTTP_TIMEOUT seconds. A larger answer is an error, not cut.
luks_http() {
  {
    if [ -n "${3:-}" ]; then
      luks_wget -q -t 1 -T "$MACULAOS_LUKS_HTTP_TIMEOUT" -O - --header 'Content-Type: application/jwk+json' \
        --post-data "$3" "$1"
    else
      luks_wget -q -t 1 -T "$MACULAOS_LUKS_HTTP_TIMEOUT" -O - "$1"
    fi 2>/dev/null
    echo $? >"$2.rc"
  } | head -c $((MACULAOS_LUKS_HTTP_MAX + 1)) >"$2"
  got=$(cat "$2.rc" 2>/dev/null); rm -f "$2.rc"
  [ "$got" = 0 ] && [ "$(wc -c <"$2")" -le "$MACULAOS_LUKS_HTTP_MAX" ]
}

# Is $1 a Tang server URL as the schema allows it (never shell or URL syntax)?
luks_tang_url_valid() { echo "$1" | grep -Eqx "$MACULAOS_LUKS_TANG_URL_RE"; }

# ... and $2 a signing key thumbprint?
luks_tang_valid() {
  luks_tang_url_valid "$1" && echo "$2" | grep -Eqx "$MACULAOS_LUKS_TANG_THP_RE"
}

# The key server URL in network token JSON $1 (cut to 512 characters, json-c's escaped slashes undone; unchecked).
luks_tang_token_url() {
  echo "$1" | sed -n 's/.*"url":"\([^"]*\)".*/\1/p' | head -c 512 | sed 's|\\/|/|g'
}

# The network up for the key server: the initrd's /init brings it up (luks_net_up), a running node has it.
luks_network() {
  if command -v luks_net_up >/dev/null 2>&1; then luks_net_up; fi
}

# Does the Tang server at URL $1 answer (its advertisement, whoever signed it, into file $2)? A running system waits
# for it up to MACULAOS_LUKS_NETWORK_WAIT seconds, as its network may still be coming up; the initrd has brought its
# own up (luks_network) and does not wait.
luks_tang_answers() {
  luks_http "$1/adv" "$2" && return 0
  command -v luks_net_up >/dev/null 2>&1 && return 1
  luks_say "waiting up to ${MACULAOS_LUKS_NETWORK_WAIT}s for the key server $1 (the network may still be coming up)"
  end=$(($(date +%s) + MACULAOS_LUKS_NETWORK_WAIT))
  while [ "$(date +%s)" -lt "$end" ]; do
    sleep 2
    luks_http "$1/adv" "$2" && return 0
  done
  return 1
}

# Encrypt key file $1 to the Tang server at URL $2, whose advertisement the signing key with thumbprint $3 (SHA-256,
# as `tang-show-keys` prints it) must have signed; the compact JWE into file $4.
luks_tang_seal() {
  luks_tang_valid "$2" "$3" || { luks_say "invalid key server URL or thumbprint"; return 1; }
  luks_network
  w=$MACULAOS_RUN/luks-tang
  rm -rf "$w" && mkdir -m 0700 "$w" || return 1
  rc=1
  if ! luks_tang_answers "$2" "$w/adv"; then
    luks_say "the key server $2 does not answer"
  elif ! luks_http "$2/adv/$3" "$w/adv"; then
    luks_say "the key server $2 sent no advertisement signed by the key $3"
  elif ! jwks=$(jose fmt -j- -Og payload -SyOg keys -AUo- <"$w/adv" 2>/dev/null) \
       || ! ver=$(printf '%s' "$jwks" | jose jwk use -i- -r -u verify -o- 2>/dev/null) \
       || ! printf '%s' "$ver" | jose jws ver -i "$w/adv" -k- -a 2>/dev/null; then
    luks_say "the key server $2 sent an advertisement that is not signed by its own keys"
  elif ! printf '%s' "$ver" | jose jwk thp -i- -f "$3" -a S256 -o /dev/null 2>/dev/null; then
    luks_say "the key server $2 has no signing key with thumbprint $3: not trusted"
  elif enc=$(printf '%s' "$jwks" | jose jwk use -i- -r -u deriveKey -o- 2>/dev/null) \
       && { printf '%s' "$enc" | jose fmt -j- -Og keys -A 2>/dev/null || enc="{\"keys\":[$enc]}"; } \
       && jwk=$(printf '%s' "$enc" | jose fmt -j- -Og keys -Af- 2>/dev/null) \
       && jwk=$(printf '%s' "$jwk" | jose fmt -j- -Od key_ops -o- | jose fmt -j- -Od alg -o-) \
       && kid=$(printf '%s' "$jwk" | jose jwk thp -i- -a S256) \
       && hdr=$(jose fmt -j '{"alg":"ECDH-ES","enc":"A256GCM","clevis":{"pin":"tang","tang":{}}}' \
                  -q "$kid" -s kid -U -g clevis -g tang -q "$2" -s url -U -j "$jwks" -s adv -UUUo-) \
       && { printf '{"protected":%s}%s' "$hdr" "$jwk"; cat "$1"; } | jose jwe enc -i- -k- -I- -c >"$4"; then
    rc=0
  else
    luks_say "the key server $2 offers no exchange key"
  fi
  rm -rf "$w"
  return $rc
}

# Decrypt JWE file $1 (luks_tang_seal's) with the Tang server at URL $2 into key file $3.
luks_tang_unseal() {
  luks_tang_url_valid "$2" || { luks_say "invalid key server URL"; return 1; }
  jwe=$(head -c "$MACULAOS_LUKS_HTTP_MAX" "$1")
  jhd=$(printf '%s' "${jwe%%.*}" | jose b64 dec -i- 2>/dev/null) \
    && clt=$(printf '%s' "$jhd" | jose fmt -j- -Og epk -Oo-) \
    && kid=$(printf '%s' "$jhd" | jose fmt -j- -Og kid -Su-) \
    && srv=$(printf '%s' "$jhd" | jose fmt -j- -Og clevis -g tang -g adv -Oo- | jose jwk thp -i- -f "$kid" -a S256) \
    && crv=$(printf '%s' "$clt" | jose fmt -j- -Og crv -Su-) \
    && eph=$(jose jwk gen -i "{\"alg\":\"ECMR\",\"crv\":\"$crv\"}") \
    && xfr=$(printf '%s%s' "$clt" "$eph" | jose jwk exc -i '{"alg":"ECMR"}' -l- -r-) \
    || { luks_say "the network key is not a Tang JWE"; return 1; }
  echo "$kid" | grep -Eqx "$MACULAOS_LUKS_TANG_THP_RE" || { luks_say "the network key names no valid key"; return 1; }
  w=$MACULAOS_RUN/luks-tang
  rm -rf "$w" && mkdir -m 0700 "$w" || return 1
  rc=1
  if ! luks_http "$2/rec/$kid" "$w/rep" "$xfr"; then
    luks_say "the key server $2 did not answer (down, or not the one that holds this key)"
  elif rep=$(jose fmt -j- -Og kty -q EC -EUUg crv -q "$crv" -EUUo- <"$w/rep" 2>/dev/null) \
       && tmp=$(printf '%s%s' "$eph" "$srv" | jose jwk exc -i '{"alg":"ECMR"}' -l- -r-) \
       && rep=$(printf '%s' "$rep" | jose jwk pub -i-) \
       && jwk=$(printf '%s%s' "$rep" "$tmp" | jose jwk exc -l- -r-) \
       && printf '%s%s' "$jwk" "$jwe" | jose jwe dec -k- -i- >"$3" 2>/dev/null; then
    rc=0
  else
    luks_say "the key server $2 did not release the key"
  fi
  jwk='' tmp='' eph=''
  rm -rf "$w"
  return $rc
}

# Open volume $1 with key slot $2 from the key network token $3 holds, released by its Tang server, which gets
# MACULAOS_LUKS_NETWORK_TRIES tries (the network may still be coming up).
luks_open_network() {
  json=$(cryptsetup token export --token-id "$3" "$1" 2>/dev/null) || return 1
  url=$(luks_tang_token_url "$json")
  k=$MACULAOS_RUN/luks-network.key
  # (sed's bounded repeats are slow on a long field: an unbounded match, then cut)
  echo "$json" | sed -n 's/.*"jwe":"\([A-Za-z0-9_.-]*\)".*/\1/p' | head -c "$MACULAOS_LUKS_HTTP_MAX" >"$k.jwe"
  if ! luks_tang_url_valid "$url"; then
    rm -f "$k.jwe"
    luks_say "a network key names no valid key server URL: trying the next key source"
    return 1
  fi
  luks_network
  n=1
  while [ "$n" -le "$MACULAOS_LUKS_NETWORK_TRIES" ]; do
    # (each call sets its own variables: nothing of theirs is read after it)
    if luks_tang_unseal "$k.jwe" "$url" "$k" \
       && cryptsetup open --key-slot "$2" --key-file "$k" "$1" "$MACULAOS_LUKS_MAPPER"; then
      rm -f "$k" "$k.jwe"
      luks_say "unlocked with the key server $url"
      return 0
    fi
    n=$((n + 1))
    [ "$n" -le "$MACULAOS_LUKS_NETWORK_TRIES" ] && sleep 1
  done
  rm -f "$k" "$k.jwe"
  luks_say "the key server ${url:-?} did not unlock the data partition: trying the next key source"
  return 1
}

# Open volume $1 with key slot $2 from the key tpm token $3 seals for boot slot $4.
luks_open_tpm() {
  k=$MACULAOS_RUN/luks-tpm.key
  # (luks_tpm_unseal sets rc too: it is set here after it, in both branches)
  if luks_tpm_unseal "$1" "$3" "$k" && cryptsetup open --key-slot "$2" --key-file "$k" "$1" "$MACULAOS_LUKS_MAPPER"
  then
    luks_say "unlocked with the TPM (the key sealed for slot $4)"; rc=0
  else
    luks_say "the TPM does not release the key sealed for slot $4 (another machine, boot loader or kernel?)"; rc=1
  fi
  rm -f "$k"
  [ $rc -eq 0 ] || return 1
  # the installer's key (sealed to fewer PCRs): this first boot seals one to all of them, as it measured them
  if [ "$(luks_tpm_pcrs "$(cryptsetup token export --token-id "$3" "$1")")" != "$MACULAOS_LUKS_TPM_PCRS" ]; then
    luks_tpm_enroll "$1" "$4" '' "$4" || luks_say "slot $4 keeps the installer's key"
  fi
  return 0
}

# Unlock volume $1 as /dev/mapper/$MACULAOS_LUKS_MAPPER with the first key source, in token order, that opens it;
# of the tpm keys, only the one sealed for boot slot $2 (when given).
luks_unlock() (
  sources=$(luks_sources "$1")
  [ -n "$sources" ] || { luks_say "$1 has no MaculaOS key slot"; return 1; }
  while read -r slot src label token; do
    case "$src" in
      usb) luks_open_usb "$1" "$slot" "$label" && return 0 ;;
      network) luks_open_network "$1" "$slot" "$token" && return 0 ;;
      tpm) [ -z "${2:-}" ] || [ "$2" = "$label" ] || continue
           luks_open_tpm "$1" "$slot" "$token" "$label" && return 0 ;;
      passphrase) luks_open_passphrase "$1" "$slot" && return 0 ;;
    esac
  done <<EOF
$sources
EOF
  return 1
)

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
# touched: a missing key disk or a passphrase not given leaves the volume as it was. A tpm key is sealed for boot
# slot MACULAOS_LUKS_TPM_BOOT to the PCRs MACULAOS_LUKS_TPM_PCR_LIST (default: all), their values in the file
# MACULAOS_LUKS_TPM_PCR_VALUES (default: this boot's).
luks_create() (
  luks_make new "$@"
)

# Crypto-erase volume $1 (closed): its key slots are wiped, so what it held can never be read again, and a new
# volume is made with the same cipher and key sources (the key disk's key is kept, a new passphrase asked for, a
# new tpm key sealed for this boot's slot, MACULAOS_LUKS_TPM_BOOT, with this boot's PCRs).
luks_recreate() (
  sources=$(luks_sources "$1")
  [ -n "$sources" ] || { luks_say "$1 has no MaculaOS key slot"; return 1; }
  cipher=$(luks_cipher "$1") || { luks_say "$1 has no cipher MaculaOS makes"; return 1; }
  label=$(echo "$sources" | awk '$2 == "usb" { print $3; exit }')
  # the key server the old network key named (checked by luks_make, as a header anyone may have written must be)
  network=$(echo "$sources" | awk '$2 == "network" { print $4; exit }')
  if [ -n "$network" ]; then
    json=$(cryptsetup token export --token-id "$network" "$1")
    MACULAOS_LUKS_TANG_URL=$(luks_tang_token_url "$json")
    MACULAOS_LUKS_TANG_THP=$(echo "$json" | sed -n 's/.*"thp":"\([A-Za-z0-9_-]*\)".*/\1/p' | head -c 86)
  fi
  # shellcheck disable=SC2046  # one source per word (a tpm key per boot slot: one source)
  luks_make erase "$1" "$cipher" "${label:-$MACULAOS_LUKS_USB_LABEL}" $(echo "$sources" | awk '!seen[$2]++ {print $2}')
)

# luks_make new|erase DEV CIPHER LABEL SOURCE...
luks_make() {
  how=$1 dev=$2 cipher=$3 label=$4
  shift 4
  case " $MACULAOS_LUKS_CIPHERS " in *" $cipher "*) ;; *) luks_say "unknown cipher $cipher"; return 1 ;; esac
  echo "$label" | grep -Eqx "$MACULAOS_LUKS_USB_LABEL_RE" || { luks_say "invalid key disk label $label"; return 1; }
  [ $# -gt 0 ] || { luks_say "no key source"; return 1; }
  case " $* " in
    *" tpm "*) luks_boot_slot "${MACULAOS_LUKS_TPM_BOOT:-}" || return 1 ;;
  esac
  case " $* " in
    *" network "*) luks_tang_valid "${MACULAOS_LUKS_TANG_URL:-}" "${MACULAOS_LUKS_TANG_THP:-}" \
                     || { luks_say "no valid key server URL and thumbprint for the network key"; return 1; } ;;
  esac
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

# Is $1 a boot slot a tpm key can be sealed for?
luks_boot_slot() {
  case "$1" in A|B) return 0 ;; esac
  luks_say "no boot slot to seal the tpm key for"
  return 1
}

# A tpm token's own fields: the boot slot it is sealed for ($1), the sealed object (files $2.pub and $2.priv).
luks_tpm_fields() {
  luks_boot_slot "$1" || return 1
  printf ',"boot":"%s","pcrs":"%s","pub":"%s","priv":"%s"' "$1" "${3:-$MACULAOS_LUKS_TPM_PCRS}" \
    "$(base64 -w0 <"$2.pub")" "$(base64 -w0 <"$2.priv")"
}

# Each source's key into $keys/<its key slot> (tpm: sealed into $keys/<slot>.sealed.pub|priv too).
luks_gather() {
  label=$1 slot=0
  shift
  for src in "$@"; do
    case "$src" in
      usb) luks_usb_key "$label" "$keys/$slot" || return 1 ;;
      passphrase) luks_new_passphrase "$keys/$slot" || return 1 ;;
      network) head -c "$MACULAOS_LUKS_KEY_BYTES" /dev/urandom >"$keys/$slot" \
                 && luks_tang_seal "$keys/$slot" "$MACULAOS_LUKS_TANG_URL" "$MACULAOS_LUKS_TANG_THP" \
                      "$keys/$slot.jwe" || return 1 ;;
      tpm) head -c "$MACULAOS_LUKS_KEY_BYTES" /dev/urandom >"$keys/$slot" \
             && luks_tpm_seal "$keys/$slot" "${MACULAOS_LUKS_TPM_PCR_VALUES:-}" "$keys/$slot.sealed" \
                  "${MACULAOS_LUKS_TPM_PCR_LIST:-}" || return 1 ;;
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
    [ "$src" = passphrase ] || kdf="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"  # 512 random bits: no stretching
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
    [ "$src" = network ] && extra=$(printf ',"url":"%s","thp":"%s","jwe":"%s"' "$MACULAOS_LUKS_TANG_URL" \
                                      "$MACULAOS_LUKS_TANG_THP" "$(cat "$keys/$slot.jwe")")
    if [ "$src" = tpm ]; then
      extra=$(luks_tpm_fields "$MACULAOS_LUKS_TPM_BOOT" "$keys/$slot.sealed" "${MACULAOS_LUKS_TPM_PCR_LIST:-}") \
        || return 1
    fi
    printf '{"type":"maculaos-%s","keyslots":["%s"],"rank":%s%s}' "$src" "$slot" "$slot" "$extra" \
      | cryptsetup token import --token-id "$slot" --json-file - "$dev" >/dev/null || return 1
    slot=$((slot + 1))
  done
  cryptsetup open --key-file "$keys/0" "$dev" "$MACULAOS_LUKS_MAPPER" \
    && /sbin/mkfs.ext4 -q -L MACULA_DATA "/dev/mapper/$MACULAOS_LUKS_MAPPER"
}

# Seal a new key for boot slot $2 (its PCR values in file $3) into a new key slot of volume $1, which this boot's
# own tpm key (sealed for slot $4) opens; then drop slot $2's older tpm keys. An update runs this after writing
# slot $2. A power cut before the token is in leaves a key slot whose key nobody holds (the next enrollment takes
# another); one before the old tokens go leaves two for slot $2, the old one refused by the TPM, the new one opening.
luks_tpm_enroll() (
  dev=$1 boot=$2 values=$3 running=$4
  keys=$MACULAOS_RUN/luks-keys
  rm -rf "$keys" && mkdir -m 0700 "$keys" || return 1
  sources=$(luks_sources "$dev")
  current=$(echo "$sources" | awk -v b="$running" '$2 == "tpm" && $3 == b {print $4; exit}')
  used=$(printf '%s\n%s\n' "$sources" "$(cryptsetup luksDump "$dev" | sed -n 's/^  \([0-9]\{1,2\}\): luks2$/\1/p')")
  free=0  # the first id with neither a token nor a key slot (a key slot without a token: an interrupted enrollment)
  while echo "$used" | awk -v n="$free" '$1 == n || $4 == n {found=1} END {exit !found}'; do free=$((free + 1)); done
  rc=1
  if [ -z "$current" ]; then
    luks_say "no tpm key for the running slot $running: slot $boot gets none (it will ask another key source)"
  elif ! luks_tpm_unseal "$dev" "$current" "$keys/current"; then
    luks_say "the TPM does not release the running slot's key: slot $boot gets none"
  elif [ "$free" -ge "$MACULAOS_LUKS_MAX_TOKENS" ]; then
    luks_say "no free key slot for slot $boot's tpm key"
  elif head -c "$MACULAOS_LUKS_KEY_BYTES" /dev/urandom >"$keys/new" \
       && luks_tpm_seal "$keys/new" "$values" "$keys/new.sealed" \
       && cryptsetup luksAddKey --batch-mode --key-slot "$free" --key-file "$keys/current" \
            --pbkdf pbkdf2 --pbkdf-force-iterations 1000 "$dev" "$keys/new" \
       && fields=$(luks_tpm_fields "$boot" "$keys/new.sealed") \
       && rank=$(luks_rank "$(cryptsetup token export --token-id "$current" "$dev")" "$current") \
       && printf '{"type":"maculaos-tpm","keyslots":["%s"],"rank":%s%s}' "$free" "$rank" "$fields" \
            | cryptsetup token import --token-id "$free" --json-file - "$dev" >/dev/null; then
    rc=0
    echo "$sources" | awk -v b="$boot" '$2 == "tpm" && $3 == b {print $1, $4}' | while read -r old token; do
      cryptsetup token remove --token-id "$token" "$dev" && cryptsetup luksKillSlot --batch-mode "$dev" "$old"
    done
    luks_say "sealed a key for slot $boot to the TPM (key slot $free)"
  fi
  rm -rf "$keys"
  return $rc
)
