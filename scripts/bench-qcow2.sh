#!/usr/bin/env bash
# Reproduces the qcow2 figures in docs/BENCHMARKS.md: 4 KiB random reads on a
# fully allocated qcow2 against raw on the same data, and 64 KiB allocating
# sequential writes against qemu-storage-daemon. Run `make` first.
# Usage: scripts/bench-qcow2.sh [WORKDIR] (default: a new temp dir)
set -euo pipefail
bin=$(cd "$(dirname "$0")/.." && pwd)/bin
dir=${1:-$(mktemp -d)}
cd "$dir"
wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no socket $1" >&2; return 1; }
serve() { "$bin/krun-core" serve --socket "$1" --disk "$2" >"$1.log" 2>&1 & echo $!; }
bench() { "$bin/krun-bench" blk --socket "$1" --seconds 5 --workloads "$2" | head -n -"$3"; }

head -c 1G /dev/urandom >data.raw
qemu-img convert -f raw -O qcow2 data.raw data.qcow2
for round in 1 2; do
	for fmt in raw qcow2; do
		pid=$(serve "$dir/$fmt.sock" "path=$dir/data.$fmt,format=$fmt,readonly=on")
		wait_sock "$dir/$fmt.sock"
		bench "$dir/$fmt.sock" randread-4k-qd1,randread-4k-qd32 3 | sed "s/^/round $round $fmt: /"
		kill -TERM "$pid"; wait "$pid" || true
	done
done
for round in 1 2 3; do
	rm -f k.qcow2 q.qcow2 q.sock
	qemu-img create -q -f qcow2 k.qcow2 4G
	qemu-img create -q -f qcow2 q.qcow2 4G
	pid=$(serve "$dir/k.sock" "path=$dir/k.qcow2,format=qcow2")
	wait_sock "$dir/k.sock"
	bench "$dir/k.sock" seqwrite-64k-qd1 2 | sed "s/^/round $round krun-core: /"
	kill -TERM "$pid"; wait "$pid" || true
	qemu-storage-daemon --blockdev "driver=file,node-name=file,filename=$dir/q.qcow2" \
		--blockdev driver=qcow2,node-name=fmt,file=file \
		--export "type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path=$dir/q.sock,writable=on" >q.log 2>&1 &
	qsd=$!
	wait_sock "$dir/q.sock"
	bench "$dir/q.sock" seqwrite-64k-qd1 2 | sed "s/^/round $round qemu-storage-daemon: /"
	kill -TERM "$qsd"; wait "$qsd" || true
	qemu-img check -q k.qcow2 && echo "round $round: krun-core's image passes qemu-img check"
done
