#!/bin/sh
# Makes a test CA, a server certificate for the NATS server and a client certificate, with
# openssl, into DIR (default ./certs). For a test or a laptop: production certificates
# come from your PKI. Usage: make-certs.sh [DIR] [SERVER_NAME ...]
# The server certificate names localhost, 127.0.0.1 and every SERVER_NAME given (e.g. the
# compose or Kubernetes service name "nats").
set -eu
dir=${1:-certs}
[ $# -gt 0 ] && shift
mkdir -p "$dir"
cd "$dir"
umask 077

san="DNS:localhost,IP:127.0.0.1"
for n in "$@"; do san="$san,DNS:$n"; done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
	-subj "/CN=otpflow test CA" -keyout ca-key.pem -out ca.pem \
	-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

issue() { # name subject extendedKeyUsage [san]
	openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
		-keyout "$1-key.pem" -out "$1.csr"
	{
		echo "basicConstraints=critical,CA:FALSE"
		echo "keyUsage=critical,digitalSignature"
		echo "extendedKeyUsage=$3"
		[ -n "${4:-}" ] && echo "subjectAltName=$4"
	} >"$1.ext"
	openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 365 \
		-extfile "$1.ext" -out "$1.pem"
	rm -f "$1.csr" "$1.ext"
}
issue server "otpflow nats" serverAuth "$san"
issue client "otpflow client" clientAuth
chmod 644 ca.pem server.pem client.pem
echo "wrote $(pwd): ca.pem (trust it: OTP_NATS_TLS_CA), server.pem/server-key.pem, client.pem/client-key.pem"
