#!/usr/bin/env bash
# Two hosts on this machine, for multi-node tests: network namespaces astra_h0 and astra_h1 joined by a veth
# pair (10.77.0.1 and 10.77.0.2, addresses of our own that nothing outside reaches), each running its own sshd
# with a config, host key and pid file made here, and a client key and ssh config for the launchers.
#
#   tools/two_hosts.sh up      # prints the variables to export (ASTRA_HOSTS_DIR, PDSH_SSH_ARGS_APPEND, ...)
#   tools/two_hosts.sh run 1 CMD...   # CMD inside host 1's namespace
#   tools/two_hosts.sh down    # stops both sshd, removes the namespaces and the state directory
#
# Both hosts see this machine's file system (namespaces separate the network only): paths are the same on both,
# as on a cluster with a shared file system. Needs root (ip netns) and openssh-server (apt-get install
# openssh-server pdsh).
set -euo pipefail

STATE=${ASTRA_HOSTS_DIR:-/tmp/astra_two_hosts}
NAMES=(astra_h0 astra_h1)
ADDRS=(10.77.0.1 10.77.0.2)

up() {
    down quiet
    mkdir -p "$STATE"
    ip netns add "${NAMES[0]}"
    ip netns add "${NAMES[1]}"
    ip link add astra_v0 type veth peer name astra_v1
    for i in 0 1; do  # named astra0 on both hosts: one GLOO_SOCKET_IFNAME serves every rank
        ip link set "astra_v$i" netns "${NAMES[$i]}"
        ip -n "${NAMES[$i]}" link set "astra_v$i" name astra0
        ip -n "${NAMES[$i]}" addr add "${ADDRS[$i]}/24" dev astra0
        ip -n "${NAMES[$i]}" link set astra0 up
        ip -n "${NAMES[$i]}" link set lo up
    done
    ssh-keygen -q -t ed25519 -N "" -f "$STATE/host_key"
    ssh-keygen -q -t ed25519 -N "" -f "$STATE/client_key"
    cp "$STATE/client_key.pub" "$STATE/authorized_keys"
    mkdir -p /run/sshd
    for i in 0 1; do
        cat > "$STATE/sshd_$i.conf" <<EOF
ListenAddress ${ADDRS[$i]}
Port 22
HostKey $STATE/host_key
PidFile $STATE/sshd_$i.pid
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
UsePAM no
AcceptEnv *
EOF
        ip netns exec "${NAMES[$i]}" /usr/sbin/sshd -f "$STATE/sshd_$i.conf" -E "$STATE/sshd_$i.log"
    done
    cat > "$STATE/ssh_config" <<EOF
Host ${ADDRS[0]} ${ADDRS[1]}
    User root
    IdentityFile $STATE/client_key
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    ConnectTimeout 10
EOF
    printf '%s slots=1\n%s slots=1\n' "${ADDRS[0]}" "${ADDRS[1]}" > "$STATE/hostfile"
    # what the deepspeed launcher exports on every host (DS_ENV_FILE names this file)
    printf 'DS_ACCELERATOR=cpu\nGLOO_SOCKET_IFNAME=astra0\n' > "$STATE/deepspeed_env"
    for i in 0 1; do  # both hosts answer over ssh from the other's namespace
        ip netns exec "${NAMES[$((1 - i))]}" ssh -F "$STATE/ssh_config" "${ADDRS[$i]}" true
    done
    echo "ASTRA_HOSTS_DIR=$STATE"
    echo "PDSH_SSH_ARGS_APPEND='-F $STATE/ssh_config'"
    echo "HOSTFILE=$STATE/hostfile"
    echo "DS_ENV_FILE=$STATE/deepspeed_env"
}

down() {
    for i in 0 1; do
        if [[ -f "$STATE/sshd_$i.pid" ]]; then
            kill "$(cat "$STATE/sshd_$i.pid")" 2>/dev/null || true
        fi
        ip netns pids "${NAMES[$i]}" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "${NAMES[$i]}" 2>/dev/null || true
    done
    rm -rf "$STATE"
    [[ "${1:-}" == quiet ]] || echo "two hosts down"
}

run() {
    local host=$1
    shift
    ip netns exec "${NAMES[$host]}" "$@"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 up | down | run HOST CMD..." >&2; exit 2 ;;
esac
