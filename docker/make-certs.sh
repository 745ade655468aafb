#!/bin/sh
# Throwaway certificates for docker/compose.tls.yaml: a private CA, the cloud's server certificate
# (names: cloud, offramp-cloud (the Kubernetes Service), localhost, 127.0.0.1) and one client
# certificate the edges share (mutual TLS).
# Valid for 30 days; for trying TLS out, not for production (use your own PKI there).
#
#   sh docker/make-certs.sh [DIR]      # default: docker/certs (git- and docker-ignored)
set -eu
dir=${1:-$(dirname "$0")/certs}
mkdir -p "$dir"
cd "$dir"
days=30
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
  -subj "/CN=offramp throwaway CA" -keyout ca.key -out ca.pem 2>/dev/null
issue() {  # name, subject CN, extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$2" \
    -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue cloud cloud "subjectAltName=DNS:cloud,DNS:offramp-cloud,DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
issue edge edge "extendedKeyUsage=clientAuth"
rm -f ca.srl ca.key   # nothing more will be signed with this CA
# The daemons run as an unprivileged user in their containers and read the keys through bind mounts.
chmod 644 cloud.key edge.key
echo "wrote $(pwd): ca.pem, cloud.pem, cloud.key, edge.pem, edge.key (valid $days days)"
