#!/usr/bin/env bash
# Create development certificates and broker credentials for the secure configuration.
#   scripts/dev-certs.sh [OUTDIR] [DEVICE ...]
# OUTDIR (default mosquitto/secure/certs) receives: ca.crt/ca.key, server.crt/server.key
# (for localhost, 127.0.0.1 and the compose host name "mosquitto"), client.crt/client.key
# (for mutual TLS), passwd (Mosquitto password file) and one <user>.password file per user
# (anomalyd, alerts, and each DEVICE; default devices pump-001 pump-002 pump-003), and
# http.token (the bearer token for anomalyd's HTTP requests that change state).
# Development only: the CA key sits beside the certificates. Never commit OUTDIR.
# CERTS_FOR_CONTAINERS=1 makes keys and passwords readable by the containers' users.
set -euo pipefail
out=${1:-mosquitto/secure/certs}
shift || true
devices=("$@")
[ ${#devices[@]} -gt 0 ] || devices=(pump-001 pump-002 pump-003)
days=${CERT_DAYS:-365}
command -v openssl >/dev/null || { echo "openssl is required" >&2; exit 1; }
passwd_bin=$(command -v mosquitto_passwd || echo /usr/bin/mosquitto_passwd)
[ -x "$passwd_bin" ] || { echo "mosquitto_passwd is required (package mosquitto)" >&2; exit 1; }
mkdir -p "$out"
umask 077
cd "$out"

echo "creating a development CA and certificates in $out (valid $days days)" >&2
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days "$days" \
  -subj "/CN=anomalyd development CA" 2>/dev/null
cat > server.ext <<EXT
subjectAltName = DNS:localhost, DNS:mosquitto, IP:127.0.0.1
extendedKeyUsage = serverAuth
EXT
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt \
  -days "${SERVER_CERT_DAYS:-$days}" -extfile server.ext 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj "/CN=anomalyd" 2>/dev/null
openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt \
  -days "$days" 2>/dev/null
rm -f server.csr client.csr server.ext

rm -f passwd
touch passwd
for user in anomalyd alerts "${devices[@]}"; do
  pw=$(openssl rand -hex 16)
  printf '%s' "$pw" > "$user.password"
  "$passwd_bin" -b passwd "$user" "$pw"
done
# The bearer token for anomalyd's HTTP requests that change state (HEALTH_TOKEN_FILE).
openssl rand -hex 32 > http.token
chmod 644 ca.crt server.crt client.crt
if [ "${CERTS_FOR_CONTAINERS:-0}" = 1 ]; then
  # docker compose: the broker and the daemon run as their own users in their containers
  # and must read the keys and password files. Development only.
  chmod 644 server.key client.key passwd ./*.password http.token
fi
echo "done: users anomalyd, alerts, ${devices[*]} (passwords in $out/<user>.password)" >&2
