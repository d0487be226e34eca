#!/usr/bin/env bash
# Make the files docker-compose.tls.yml mounts (docs/security.md): a private CA, a certificate
# for the search service and one for the reward server, signed by it, and two random tokens.
#
#   scripts/make-tls.sh [DIR] [EXTRA_SEARCH_NAME ...]    # DIR default ./.secrets/tls
#
# EXTRA_SEARCH_NAME: DNS names or IP addresses clients use for the search API (added to its
# SANs next to search, localhost and 127.0.0.1). Existing files are kept (rotate: delete them).
# Keys and tokens are mode 0400; with root, everything is owned by uid 10001, the containers'
# user (compose bind-mounts secret files as they are on the host).
set -euo pipefail
DIR=${1:-./.secrets/tls}
shift || true
DAYS=${ETS_TLS_DAYS:-825}
mkdir -p "$DIR"
cd "$DIR"
umask 077

if [ ! -f ca.pem ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem -out ca.pem \
    -days "$DAYS" -subj "/CN=ets-ca" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

san_of() {  # name extra... -> subjectAltName value
  local out="DNS:$1,DNS:localhost,IP:127.0.0.1" n
  shift
  for n in "$@"; do
    if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then out+=",IP:$n"; else out+=",DNS:$n"; fi
  done
  echo "$out"
}

cert() {  # name extra...
  local name=$1
  [ -f "$name.pem" ] && return
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$name-key.pem" -out "$name.csr" \
    -subj "/CN=$name" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$(san_of "$@")" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out "$name.pem" \
    -days "$DAYS" -extfile "$name.ext" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

cert search "$@"
# reward-replicas: the name the search service balances over (dns:///reward-replicas:50052).
cert reward reward-replicas
for t in search-token reward-token; do
  [ -f "$t" ] || openssl rand -hex 32 > "$t"
done
chmod 0444 ca.pem search.pem reward.pem
chmod 0400 search-key.pem reward-key.pem search-token reward-token
if [ "$(id -u)" = 0 ]; then chown 10001:10001 ca.pem search.pem search-key.pem reward.pem reward-key.pem search-token reward-token; fi
echo "make-tls.sh: $(pwd): ca.pem, search.pem/-key.pem, reward.pem/-key.pem, search-token, reward-token (ca-key.pem: keep offline)"
