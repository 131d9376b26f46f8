#!/usr/bin/env bash
# Reachable-vulnerability check behind `make vuln`: govulncheck (symbol level, its default)
# over each module directory given as an argument, against a vulnerability database built
# offline from the golang.org/x/vulndb module, since vuln.go.dev cannot be reached from our
# machines. Exits 1 when a module calls a vulnerable symbol or cannot be scanned.
#
#   .ci/vuln.sh events platform ...       # what `make vuln` runs, with GOTOOLCHAIN exported
#
# Environment:
#   GOTOOLCHAIN     builds govulncheck and indexdb, and is the toolchain scanned (Makefile: go1.27.3)
#   VULN_TOOLCHAIN  scan against another toolchain's standard library instead, e.g. `local`
#                   (the machine's go1.26.8) to see the check fail
#   VULNDB_VERSION  golang.org/x/vulndb version to use; default `latest`, the newest the module
#                   proxy serves, so a newly published vulnerability fails the check
#   OTPFLOW_CACHE   where the built databases and tools are kept;
#                   default ${XDG_CACHE_HOME:-$HOME/.cache}/otpflow
set -euo pipefail

readonly GOVULNCHECK_VERSION=v1.9.0
readonly VULNDB_MODULE=golang.org/x/vulndb

die() { echo "vuln: $*" >&2; exit 1; }
say() { echo "vuln: $*"; }

(($# > 0)) || die "usage: $0 MODULE_DIR... (the Makefile passes its MODULES)"
root="$(cd "$(dirname "$0")/.." && pwd)"
go="${GO:-go}"
command -v "$go" >/dev/null || die "no '$go' on PATH"
cache="${OTPFLOW_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/otpflow}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Tool commands run in an empty directory, outside go.work and every go.mod, so they resolve
# the tools' own dependencies and never touch the project's.
gotool() { (cd "$work" && GOWORK=off "$go" "$@"); }

toolgo="$(gotool env GOVERSION)" || die "cannot run the toolchain GOTOOLCHAIN=${GOTOOLCHAIN:-} names"
say "tools built with $toolgo (GOTOOLCHAIN=${GOTOOLCHAIN:-unset})"

# --- The vulnerability database -------------------------------------------------------------
# govulncheck's file:// client (x/vuln internal/client, v1.9.0) reads index/db.json,
# index/modules.json and ID/<id>.json, uncompressed. indexdb writes those plus .gz twins,
# which only an HTTP server needs; they are dropped to halve the cache.
dbroot="$cache/vulndb"
# vulndb has only pseudo-versions, which sort by their timestamp.
newest_cached() {
  local d newest=
  for d in "$dbroot"/v*; do
    [[ -f "$d/index/modules.json" && "${d##*/}" > "$newest" ]] && newest="${d##*/}"
  done
  echo "$newest"
}
want="${VULNDB_VERSION:-latest}"
if gotool mod download -json "$VULNDB_MODULE@$want" >"$work/vulndb.json" 2>"$work/vulndb.err"; then
  version="$(sed -n 's/^\t"Version": "\(.*\)",$/\1/p' "$work/vulndb.json")"
  src="$(sed -n 's/^\t"Dir": "\(.*\)",$/\1/p' "$work/vulndb.json")"
  [[ -n "$version" && -d "$src/data/osv" ]] || die "unexpected answer for $VULNDB_MODULE@$want: $(cat "$work/vulndb.json")"
elif [[ "$want" == latest && "${VULNDB_OFFLINE_OK:-}" == 1 ]] && version="$(newest_cached)" && [[ -n "$version" ]]; then
  # Offline, and told that a check against the last database we built beats none: a
  # stale database must never pass by default, since it misses what was published since.
  say "WARNING: cannot ask the module proxy for $VULNDB_MODULE@latest; using the cached $version (VULNDB_OFFLINE_OK=1)"
  sed -n 's/^\t"Error": "\(.*\)"$/vuln:   \1/p' "$work/vulndb.json" >&2
  sed 's/^/vuln:   /' "$work/vulndb.err" >&2
else
  cat "$work/vulndb.json" "$work/vulndb.err" >&2
  die "cannot download $VULNDB_MODULE@$want"
fi
db="$dbroot/$version"

if [[ -f "$db/index/modules.json" ]]; then
  say "vulnerability database $VULNDB_MODULE@$version (cached in $db)"
else
  say "building the vulnerability database from $VULNDB_MODULE@$version into $db"
  start=$SECONDS
  # indexdb lives in the vulndb module; @version builds it against that module's own go.mod,
  # fetching only the modules its packages import. It is needed only here, so it is not kept
  # (the build cache makes a later rebuild cheap).
  GOBIN="$work/bin" gotool install "$VULNDB_MODULE/cmd/indexdb@$version" ||
    die "cannot build $VULNDB_MODULE/cmd/indexdb@$version"
  mkdir -p "$dbroot"
  tmp="$(mktemp -d "$dbroot/$version.tmp.XXXXXX")"
  "$work/bin/indexdb" -vulns "$src/data/osv" -out "$tmp" || { rm -rf "$tmp"; die "indexdb failed"; }
  find "$tmp" -name '*.json.gz' -delete
  [[ -f "$tmp/index/db.json" && -f "$tmp/index/modules.json" && -d "$tmp/ID" ]] ||
    { rm -rf "$tmp"; die "indexdb wrote no index/db.json, index/modules.json or ID/"; }
  # Rename into place so a run that stops halfway never leaves a database that looks built;
  # if a concurrent run got there first, keep its copy.
  mv -T "$tmp" "$db" 2>/dev/null || rm -rf "$tmp"
  say "built $(find "$db/ID" -name '*.json' | wc -l) entries in $((SECONDS - start))s"
  # Older databases are superseded; keep only this one.
  for old in "$dbroot"/*; do
    [[ "$old" == "$db" || "$old" == *.tmp.* ]] || rm -rf "$old"
  done
fi

# --- govulncheck ----------------------------------------------------------------------------
govulncheck="$cache/tools/$toolgo/govulncheck-$GOVULNCHECK_VERSION"
if [[ ! -x "$govulncheck" ]]; then
  say "building govulncheck $GOVULNCHECK_VERSION with $toolgo"
  GOBIN="$work/bin" gotool install "golang.org/x/vuln/cmd/govulncheck@$GOVULNCHECK_VERSION" ||
    die "cannot build govulncheck@$GOVULNCHECK_VERSION"
  mkdir -p "$(dirname "$govulncheck")"
  mv -f "$work/bin/govulncheck" "$govulncheck"
fi

# --- The scan -------------------------------------------------------------------------------
# govulncheck asks `go env GOVERSION` which standard library to check, so the toolchain
# scanned is the one GOTOOLCHAIN selects in its environment. go.work sits at the root,
# which is no module, so govulncheck runs in each module directory (in workspace mode).
export GOTOOLCHAIN="${VULN_TOOLCHAIN:-${GOTOOLCHAIN:-}}"
scango="$(cd "$root" && "$go" env GOVERSION)" || die "cannot run the toolchain GOTOOLCHAIN=$GOTOOLCHAIN names"
say "scanning against the $scango standard library (GOTOOLCHAIN=$GOTOOLCHAIN)"

vulnerable=() broken=()
for m in "$@"; do
  [[ -f "$root/$m/go.mod" ]] || die "$m: no go.mod under $root"
  echo "== vuln $m"
  rc=0
  (cd "$root/$m" && "$govulncheck" -db "file://$db" ./...) || rc=$?
  case $rc in
    0) ;;
    3) vulnerable+=("$m") ;;
    *) broken+=("$m") ;;
  esac
done

((${#broken[@]} == 0)) || say "could not scan: ${broken[*]}"
((${#vulnerable[@]} == 0)) || say "reachable vulnerabilities with $scango in: ${vulnerable[*]}"
if ((${#broken[@]} + ${#vulnerable[@]} > 0)); then
  exit 1
fi
say "no reachable vulnerabilities in $# modules with $scango ($VULNDB_MODULE@$version)"
