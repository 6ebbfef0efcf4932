#!/usr/bin/env bash
# A full key lifecycle through server reflection alone (no proto files): buf curl, as a platform
# engineer would use it. Starts its own server unless KEY_AUTHORITY_ADDR names a running one.
# Usage: clients/buf/lifecycle.sh [path/to/key-authority]
set -euo pipefail

bin=${1:-target/debug/key-authority}
token=${KEY_AUTHORITY_ADMIN_TOKEN:-buf-lifecycle-admin-token}
workdir=$(mktemp -d)
cleanup() {
  [ -n "${server_pid:-}" ] && kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" || true
  rm -rf "$workdir"
}
trap cleanup EXIT

if [ -z "${KEY_AUTHORITY_ADDR:-}" ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  KEY_AUTHORITY_ADDR=127.0.0.1:$port
  KEY_AUTHORITY_ADMIN_TOKEN=$token "$bin" serve --listen "$KEY_AUTHORITY_ADDR" \
    --database-url "sqlite://$workdir/keys.db" 2>"$workdir/server.log" &
  server_pid=$!
fi
url=http://$KEY_AUTHORITY_ADDR

# field FILE PATH: prints a value from a JSON answer (PATH like key.keyId).
field() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))
for part in sys.argv[2].split("."): v=v.get(part, "") if isinstance(v, dict) else ""
print(v)' "$1" "$2"; }
expect() { [ "$1" = "$2" ] || { echo "FAIL: $3: expected '$2', got '$1'" >&2; exit 1; }; }

for _ in $(seq 1 100); do
  buf curl --protocol grpc --http2-prior-knowledge -d '{"service": ""}' \
    "$url/grpc.health.v1.Health/Check" >/dev/null 2>&1 && break
  sleep 0.1
done

# --- the commands README.md shows ---
buf curl --protocol grpc --http2-prior-knowledge --list-methods "$url" > "$workdir/methods"
buf curl --protocol grpc --http2-prior-knowledge \
  -H "authorization: Bearer $token" \
  -d '{"workspace_id": "acme", "name": "billing", "scopes": ["orders:read"]}' \
  "$url/keyauthority.v1.KeyService/IssueKey" > "$workdir/issued.json"
secret=$(field "$workdir/issued.json" secret)
key_id=$(field "$workdir/issued.json" key.keyId)
buf curl --protocol grpc --http2-prior-knowledge \
  -d "{\"key\": \"$secret\", \"required_scopes\": [\"orders:read\"]}" \
  "$url/keyauthority.v1.VerifyService/VerifyKey" > "$workdir/verified.json"
buf curl --protocol grpc --http2-prior-knowledge \
  -H "authorization: Bearer $token" \
  -d '{"workspace_id": "acme", "page_size": 10}' \
  "$url/keyauthority.v1.KeyService/ListKeys" > "$workdir/listed.json"
buf curl --protocol grpc --http2-prior-knowledge \
  -H "authorization: Bearer $token" \
  -d "{\"key\": {\"workspace_id\": \"acme\", \"key_id\": \"$key_id\", \"enabled\": false}, \"update_mask\": \"enabled\"}" \
  "$url/keyauthority.v1.KeyService/UpdateKey" > "$workdir/disabled.json"
buf curl --protocol grpc --http2-prior-knowledge -d "{\"key\": \"$secret\"}" \
  "$url/keyauthority.v1.VerifyService/VerifyKey" > "$workdir/verified-disabled.json"
buf curl --protocol grpc --http2-prior-knowledge \
  -H "authorization: Bearer $token" \
  -d "{\"key\": {\"workspace_id\": \"acme\", \"key_id\": \"$key_id\", \"name\": \"billing v2\", \"enabled\": true, \"etag\": \"$(field "$workdir/disabled.json" key.etag)\"}, \"update_mask\": \"name,enabled\"}" \
  "$url/keyauthority.v1.KeyService/UpdateKey" > "$workdir/enabled.json"
buf curl --protocol grpc --http2-prior-knowledge \
  -H "authorization: Bearer $token" \
  -d "{\"workspace_id\": \"acme\", \"key_id\": \"$key_id\", \"grace_period\": \"0s\"}" \
  "$url/keyauthority.v1.KeyService/RotateKey" > "$workdir/rotated.json"
new_key_id=$(field "$workdir/rotated.json" key.keyId)
buf curl --protocol grpc --http2-prior-knowledge \
  -H "authorization: Bearer $token" \
  -d "{\"workspace_id\": \"acme\", \"key_id\": \"$new_key_id\"}" \
  "$url/keyauthority.v1.KeyService/RevokeKey" > "$workdir/revoked.json"
buf curl --protocol grpc --http2-prior-knowledge \
  -H "authorization: Bearer $token" \
  -d "{\"workspace_id\": \"acme\", \"key_id\": \"$key_id\", \"action\": \"AUDIT_ACTION_DISABLE\"}" \
  "$url/keyauthority.v1.KeyService/ListAuditEvents" > "$workdir/audit.json"
# --- end of README commands ---

grep -qx 'keyauthority.v1.KeyService/IssueKey' "$workdir/methods" || { echo "FAIL: reflection lists no IssueKey" >&2; exit 1; }
expect "$(field "$workdir/verified.json" code)" VERIFY_CODE_VALID "VerifyKey of a fresh key"
expect "$(field "$workdir/listed.json" totalSize)" 1 "ListKeys total"
expect "$(field "$workdir/disabled.json" key.state)" KEY_STATE_DISABLED "UpdateKey disables"
expect "$(field "$workdir/verified-disabled.json" code)" VERIFY_CODE_DISABLED "VerifyKey of a disabled key"
expect "$(field "$workdir/enabled.json" key.state)" KEY_STATE_ACTIVE "UpdateKey enables with the etag"
expect "$(field "$workdir/enabled.json" key.name)" "billing v2" "UpdateKey renames"
audit=$(python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["auditEvents"]
print(len(e), e[0]["action"], e[0]["actor"]["display"], e[0]["changes"][0]["field"])' "$workdir/audit.json")
expect "$audit" "1 AUDIT_ACTION_DISABLE admin enabled" "ListAuditEvents filtered by key and action"
expect "$(field "$workdir/rotated.json" previousKey.rotatedToKeyId)" "$new_key_id" "RotateKey successor"
expect "$(field "$workdir/revoked.json" key.state)" KEY_STATE_REVOKED "RevokeKey state"
buf curl --protocol grpc --http2-prior-knowledge -d "{\"key\": \"$secret\"}" \
  "$url/keyauthority.v1.VerifyService/VerifyKey" > "$workdir/old.json"
expect "$(field "$workdir/old.json" code)" VERIFY_CODE_EXPIRED "the rotated-away key"

# An expiry past --max-key-lifetime (10 years by default) is refused; one just inside it is stored
# and every JSON rendering of the workspace keeps working (a year-10000 expiry used to break it).
if buf curl --protocol grpc --http2-prior-knowledge -H "authorization: Bearer $token" \
  -d '{"workspace_id": "far", "name": "forever", "ttl": "400000000s"}' \
  "$url/keyauthority.v1.KeyService/IssueKey" >/dev/null 2>"$workdir/far.err"; then
  echo "FAIL: a 12-year ttl was accepted" >&2; exit 1
fi
grep -q 'invalid_argument' "$workdir/far.err" || { echo "FAIL: 12-year ttl: $(cat "$workdir/far.err")" >&2; exit 1; }
buf curl --protocol grpc --http2-prior-knowledge -H "authorization: Bearer $token" \
  -d '{"workspace_id": "far", "name": "long", "ttl": "315000000s"}' \
  "$url/keyauthority.v1.KeyService/IssueKey" >/dev/null
buf curl --protocol grpc --http2-prior-knowledge -H "authorization: Bearer $token" \
  -d '{"workspace_id": "far"}' "$url/keyauthority.v1.KeyService/ListKeys" > "$workdir/far.json"
expect "$(field "$workdir/far.json" totalSize)" 1 "ListKeys renders a key expiring in 9.98 years"
echo "lifecycle: 13 passed, 0 failed"
