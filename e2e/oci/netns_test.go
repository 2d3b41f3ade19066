package oci_test

import (
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/krun-core/krun-core/internal/vmtest"
)

// netnsScript: a "pod" network namespace with an address and a default
// route (what CNI would set up), a container that names it, and a server
// in the guest reached at the namespace's address from inside it.
const netnsScript = `
# passt isolates itself with pivot_root, which fails on the initramfs
# root: everything runs from a tmpfs moved over / in a mount namespace of
# its own (as e2e/run's network test does).
mkdir /newroot
mount -t tmpfs -o size=1g tmpfs /newroot
for d in bin sbin usr lib lib64 etc nested b run; do [ -e /$d ] && cp -a /$d /newroot/; done
mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/tmp /newroot/run/netns
mount -t proc proc /newroot/proc
mount --rbind /sys /newroot/sys
mount --rbind /dev /newroot/dev
cat >/newroot/tmp/t.sh <<'EOF'
set -e
touch /run/netns/pod
unshare --net=/run/netns/pod true
nsenter --net=/run/netns/pod sh -c 'ip link set lo up; ip link add dummy0 type dummy; ip addr add 10.88.0.5/24 dev dummy0; ip link set dummy0 up; ip route add default via 10.88.0.1 dev dummy0'
krun-oci --root /run/ko --debug --log /tmp/net1.log --kernel $KERNEL --plugin-dir /bin create --bundle /b net1 >/tmp/net1.out 2>/tmp/net1.err &
p=$!
i=0
while kill -0 $p 2>/dev/null; do
	i=$((i+1))
	if [ $((i % 30)) = 0 ]; then
		for f in /proc/[0-9]*/comm; do
			[ "$(cat $f 2>/dev/null)" = passt ] || [ "$(cat $f 2>/dev/null)" = passt.avx2 ] || continue
			d=${f%/comm}; echo "create: $((i/2))s, passt ${d#/proc/} has $(ls $d/fd | wc -l) files"
		done
		grep MemAvailable /proc/meminfo
		top -b -n 1 | head -n 14
		tail -n 2 /tmp/net1.log
	fi
	[ $i -lt 240 ] || { kill -9 $p; grep -i 'helper\|krun-init\|virtio_net\|eth0' /tmp/net1.log | tail -n 40; tail -n 40 /tmp/net1.log; exit 7; }
	sleep 0.5
done
rc=0; wait $p || rc=$?
sed 's/^/create err| /' /tmp/net1.err
[ "$rc" = 0 ] || { grep -i 'helper\|krun-init\|virtio_net\|eth0' /tmp/net1.log | tail -n 40 | sed 's/^/create passt| /'; grep -v 'guest console|' /tmp/net1.log | tail -n 40 | sed 's/^/create log| /'; grep 'guest console|' /tmp/net1.log | tail -n 15 | sed 's/^/create console| /'; exit 3; }
echo "created in $((i/2))s"
krun-oci --root /run/ko start net1
i=0
until grep -q 'guest-ip' /tmp/net1.out; do
	i=$((i+1)); [ $i -lt 240 ] || { cat /tmp/net1.out; exit 99; }
	sleep 0.5
done
cat /tmp/net1.out
grep -q 'guest-ip 10.88.0.5' /tmp/net1.out || exit 4
i=0
until nsenter --net=/run/netns/pod sh -c 'printf "GET /page HTTP/1.0\r\n\r\n" | nc 10.88.0.5 8080' >/tmp/page 2>/dev/null && grep -q from-the-pod /tmp/page; do
	i=$((i+1)); [ $i -lt 120 ] || { cat /tmp/page; exit 5; }
	sleep 1
done
echo "fetched the page through the pod's address"
krun-oci --root /run/ko delete --force net1
sleep 1
if ps | grep -v grep | grep -q '[p]asst\|krun-plugin'; then ps; exit 6; fi
EOF
rc=0
unshare -m sh -c "cd /newroot && mount --move /newroot / && exec chroot . env KERNEL=$KERNEL sh /tmp/t.sh" || rc=$?
[ "$rc" = 99 ] && e2e_nested_hang "the container never reported its address"
[ "$rc" = 0 ] || e2e_fail "network namespace script: exit $rc"
echo "outer checks ok"
`

// TestNetworkNamespace: a container whose config names a network
// namespace gets passt there: the guest takes the namespace's address by
// DHCP, and a server in the guest answers at that address inside the
// namespace (pod networking as CNI sets it up).
func TestNetworkNamespace(t *testing.T) {
	a, payload, kernel := nestedSetup(t)
	s := busyboxSpec("sh", "-c", "echo guest-ip $(ip -4 addr show eth0 | sed -n 's/.*inet \\([0-9.]*\\).*/\\1/p'); "+
		"mkdir -p /tmp/www; echo from-the-pod >/tmp/www/page; exec httpd -f -p 8080 -h /tmp/www")
	s.Linux.Namespaces = []specs.LinuxNamespace{{Type: "pid"}, {Type: "network", Path: "/run/netns/pod"}, {Type: "mount"}}
	s.Mounts = append(s.Mounts, specs.Mount{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs"})
	// passt forwards the server's port only, to keep the test cheap:
	// every port of the namespace (the default) is about 100000 sockets
	// and some 10 s of passt's start-up under TCG.
	s.Annotations["krun.tcp_ports"] = "8080"
	s.Annotations["krun.udp_ports"] = "none"
	payload = append(payload, specFile(t, "/b/config.json", s))
	payload = append(payload, vmtest.PasstUsers()...)
	r := vmtest.NestedKVM(t, a, vmtest.NestedOptions{
		Payload:      payload,
		HostBinaries: vmtest.PasstBinaries(),
		Modules:      []string{"dummy"},
		CPUs:         2,
		Timeout:      6 * time.Minute,
		Script:       "KERNEL=" + kernel + "\n" + bundleSetup + "mkbundle /b\n" + netnsScript,
	})
	if !strings.Contains(r.Console, "fetched the page through the pod's address") {
		t.Error("the guest's server was not reached at the pod's address")
	}
}
