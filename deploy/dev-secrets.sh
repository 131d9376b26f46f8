#!/bin/sh
# Writes the development secrets that deploy/compose.yaml reads, to standard output:
#
#   sh deploy/dev-secrets.sh > deploy/.env
#
# Every key is fresh random bytes under a key id starting with "devfake": these are throwaway
# values for a laptop, never for a deployment (the production keys come from the Secrets that
# deploy/README.md lists). deploy/.env is ignored by git.
set -eu
key() { printf '%s:%s' "$1" "$(head -c 32 /dev/urandom | base64 | tr -d '\n')"; }
echo "# development only: made by deploy/dev-secrets.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "OTP_CODE_PEPPER=$(key devfake-pepper1)"
echo "OTP_SEAL_KEY=$(key devfake-seal1)"
echo "OTP_SUBJECT_KEY=$(key devfake-subject1)"
echo "OTP_DLQ_KEY=$(key devfake-dlq1)"
echo "OTP_AUDIT_KEY=$(key devfake-audit1)"
echo "OTP_AUDIT_CHAIN_KEY=$(key devfake-chain1)"
echo "OTP_AUDIT_SIGNING_KEY=$(key devfake-signing1)"
echo "POSTGRES_PASSWORD=devfake-$(head -c 12 /dev/urandom | base64 | tr -d '\n/+=')"
