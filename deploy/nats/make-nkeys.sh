#!/bin/sh
# Makes one nkey user per identity of nats-server.conf.tmpl into DIR (default ./nkeys):
# DIR/<identity>.seed (the secret, mode 0600: hand it to that process as
# OTP_NATS_NKEY_FILE) and DIR/<identity>.pub (the public key the server config holds).
# An existing seed is kept, so running it again adds only what is missing.
# Uses `nk` when installed, else runs it with the Go toolchain
# (github.com/nats-io/nkeys/nk, the version the project pins). Keep DIR out of git.
set -eu
dir=${1:-nkeys}
if command -v nk >/dev/null 2>&1; then
	nk() { command nk "$@"; }
else
	nk() { go run github.com/nats-io/nkeys/nk@v0.4.16 "$@"; }
fi
mkdir -p "$dir"
umask 077
for id in issuer dispatcher verifier auditor admin operator app_acme app_globex system; do
	if [ ! -s "$dir/$id.seed" ]; then
		nk -gen user >"$dir/$id.seed"
	fi
	nk -inkey "$dir/$id.seed" -pubout >"$dir/$id.pub"
	chmod 644 "$dir/$id.pub"
done
echo "wrote seeds and public keys for every identity to $dir"
