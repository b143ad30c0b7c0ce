#!/bin/sh
# Installs a boot-time fetch of a Secrets Manager secret, so the image carries no credentials:
# at every boot, before the app starts, the instance reads the secret with its own role
# (instance profile) and writes it to a private file in /run (tmpfs: never on disk, never in an
# AMI). The app reads that file.
#   env: SECRET_ID   the secret's name or ARN (required)
#        OUTPUT      where to write it (default /run/app/secret.json, mode 0600)
#        BEFORE      the unit that needs it (default web.service)
#        ROOT        install under this folder instead of / (for tests)
# Needs the AWS CLI on the image (Amazon Linux 2023 has it) and, on the role,
# secretsmanager:GetSecretValue on that secret (`bakery audit --secret` checks it).
set -eu
: "${SECRET_ID:?set SECRET_ID to the secret's name or ARN}"
OUTPUT="${OUTPUT:-/run/app/secret.json}"
BEFORE="${BEFORE:-web.service}"
ROOT="${ROOT:-}"
case "$SECRET_ID$OUTPUT$BEFORE" in
*"'"* | *'"'* | *'$'* | *'`'* | *'\'*) echo "install-secret-fetch: quotes, \$, \` and \\ are not allowed in SECRET_ID, OUTPUT or BEFORE" >&2; exit 2 ;;
esac

install -d -m 0755 "$ROOT/usr/local/bin" "$ROOT/etc/systemd/system" "$ROOT/etc/systemd/system/multi-user.target.wants"
cat > "$ROOT/usr/local/bin/fetch-secret" <<SCRIPT
#!/bin/sh
# Written by bakery's install-secret-fetch.sh: fetch $SECRET_ID at boot with the instance role.
set -eu
umask 077
mkdir -p "\$(dirname '$OUTPUT')"
tmp="\$(mktemp '$OUTPUT.XXXXXX')"
trap 'rm -f "\$tmp"' EXIT
aws secretsmanager get-secret-value --secret-id '$SECRET_ID' --query SecretString --output text > "\$tmp"
mv -f "\$tmp" '$OUTPUT'
trap - EXIT
SCRIPT
chmod 0755 "$ROOT/usr/local/bin/fetch-secret"
cat > "$ROOT/etc/systemd/system/fetch-secret.service" <<UNIT
[Unit]
Description=Fetch the app's secret from Secrets Manager with the instance role
Wants=network-online.target
After=network-online.target
Before=$BEFORE

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/bin/fetch-secret
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
RequiredBy=$BEFORE
UNIT
ln -sf /etc/systemd/system/fetch-secret.service "$ROOT/etc/systemd/system/multi-user.target.wants/fetch-secret.service"
echo "installed fetch-secret.service: $SECRET_ID -> $OUTPUT before $BEFORE"
