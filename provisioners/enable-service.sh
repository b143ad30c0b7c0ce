#!/bin/sh
# Enables a systemd unit for the next boot of the image (what `systemctl enable` does), whether
# or not systemd runs while baking: in a chroot or a container it makes the same symlink that
# `systemctl enable` would.
#   env: UNIT   the unit to enable, e.g. web.service (its file must be in /etc/systemd/system)
set -eu
: "${UNIT:?set UNIT to the unit to enable, e.g. env = { UNIT = \"web.service\" }}"
unit_file="/etc/systemd/system/$UNIT"
if [ ! -f "$unit_file" ]; then
  echo "enable-service: $unit_file does not exist; install the unit first" >&2
  exit 2
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  systemctl enable "$UNIT"
else
  target=$(sed -n 's/^WantedBy=//p' "$unit_file" | head -n 1)
  wants="/etc/systemd/system/${target:-multi-user.target}.wants"
  mkdir -p "$wants"
  ln -sf "$unit_file" "$wants/$UNIT"
fi
echo "enabled $UNIT"
