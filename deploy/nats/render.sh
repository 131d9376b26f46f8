#!/bin/sh
# Renders nats-server.conf.tmpl into nats-server.conf with the public keys of NKEYS
# (make-nkeys.sh) and the TLS files of CERTS (make-certs.sh).
# Usage: render.sh NKEYS CERTS STORE_DIR [LISTEN] [SERVER_NAME] [MONITOR] > nats-server.conf
# (LISTEN defaults to 0.0.0.0:4222, MONITOR, the HTTPS monitoring endpoint, to 0.0.0.0:8222.)
set -eu
here=$(dirname "$0")
nkeys=$(cd "$1" && pwd); certs=$(cd "$2" && pwd); store=$3
listen=${4:-0.0.0.0:4222}; name=${5:-otpflow-nats-1}; monitor=${6:-0.0.0.0:8222}
pub() { tr -d '\n' <"$nkeys/$1.pub"; }
sed -e "s|{{SERVER_NAME}}|$name|" -e "s|{{LISTEN}}|$listen|" -e "s|{{MONITOR}}|$monitor|" -e "s|{{STORE_DIR}}|$store|" \
	-e "s|{{TLS_CERT}}|$certs/server.pem|" -e "s|{{TLS_KEY}}|$certs/server-key.pem|" \
	-e "s|{{TLS_CA}}|$certs/ca.pem|" -e "s|{{TLS_VERIFY}}|false|" \
	-e "s|{{ISSUER_NKEY}}|$(pub issuer)|" -e "s|{{DISPATCHER_NKEY}}|$(pub dispatcher)|" \
	-e "s|{{VERIFIER_NKEY}}|$(pub verifier)|" -e "s|{{AUDITOR_NKEY}}|$(pub auditor)|" \
	-e "s|{{ADMIN_NKEY}}|$(pub admin)|" -e "s|{{OPERATOR_NKEY}}|$(pub operator)|" \
	-e "s|{{APP_ACME_NKEY}}|$(pub app_acme)|" -e "s|{{APP_GLOBEX_NKEY}}|$(pub app_globex)|" \
	-e "s|{{SYSTEM_NKEY}}|$(pub system)|" "$here/nats-server.conf.tmpl"
