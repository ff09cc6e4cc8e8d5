#!/bin/sh
# Makes a self-signed certificate for localhost and 127.0.0.1, for examples/tls.toml:
# tls/cert.pem and tls/key.pem beside this script (or in the folder given as $1).
# The key is PKCS#8 (`BEGIN PRIVATE KEY`), as baton reads it. For testing only: clients must be
# told to accept it (curl -k).
set -eu
dir=${1:-"$(dirname "$0")/tls"}
mkdir -p "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$dir/key.pem" -out "$dir/cert.pem" -days 365 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1"
chmod 600 "$dir/key.pem"
echo "wrote $dir/cert.pem and $dir/key.pem"
