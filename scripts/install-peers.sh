#!/usr/bin/env bash
# Installs the real programs the integration tests and benchmarks run against (Debian packages).
# Only installs what is missing; without root or apt-get it says what to install and carries on,
# and the tests that need a missing program skip with that reason.
set -euo pipefail

# package:program pairs; the program tells whether the package is already there.
wanted=(
  openssh-server:/usr/sbin/sshd openssh-client:ssh dante-server:danted microsocks:microsocks
  tinyproxy:tinyproxy ncat:ncat netcat-openbsd:nc.openbsd socat:socat connect-proxy:connect-proxy
  curl:curl git:git iproute2:ip nmap:nmap proxychains4:proxychains4 stunnel4:stunnel4
  squid:/usr/sbin/squid apache2-utils:htpasswd winbind:ntlm_auth samba-common-bin:smbpasswd
  krb5-kdc:/usr/sbin/krb5kdc krb5-admin-server:/usr/sbin/kadmin.local krb5-user:kinit
  apache2:/usr/sbin/apache2 cntlm:/usr/sbin/cntlm proxytunnel:proxytunnel dante-client:socksify
  dnsutils:dig
)
missing=()
for pair in "${wanted[@]}"; do
  package=${pair%%:*} program=${pair#*:}
  command -v "$program" >/dev/null 2>&1 || [ -x "$program" ] || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-peers: all peers present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-peers: missing ${missing[*]}; as root: apt-get install -y ${missing[*]} (tests needing them will skip)"
  exit 0
fi
echo "install-peers: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
echo "install-peers: done"
