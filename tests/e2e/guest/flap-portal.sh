#!/bin/bash
# A flapping iSCSI portal for the e2e tests: a TCP relay in front of tgtd that can switch to
# accepting connections and closing them at once (what a portal behind a restarting load
# balancer or a half-up target does). The guest image has perl, not socat.
#   flap-portal.sh start PORT UPSTREAM   relay PORT to UPSTREAM (host:port), in the background
#   flap-portal.sh close [LO HI]         drop the relayed connections; close new ones after LO..HI ms
#   flap-portal.sh forward               relay new connections again
#   flap-portal.sh stop                  stop the relay and its connections
set -euo pipefail
STATE=/run/flap-portal
mkdir -p "$STATE"

stop_relays() {  # the listener's children: one per relayed connection
  [ -s "$STATE/pid" ] && pkill -P "$(cat "$STATE/pid")" 2>/dev/null || true
}

case ${1:-} in
  start)
    echo forward >"$STATE/mode"
    setsid perl - "$2" "$3" "$STATE/mode" >"$STATE/log" 2>&1 <<'PERL' &
use strict;
use warnings;
use IO::Socket::INET;
use IO::Select;
my ($port, $upstream, $mode_file) = @ARGV;
$SIG{CHLD} = 'IGNORE';
my $listener = IO::Socket::INET->new(LocalPort => $port, Listen => 64, ReuseAddr => 1)
  or die "listen on $port: $!";
while (1) {
  my $client = $listener->accept or next;
  open(my $fh, '<', $mode_file) or die "$mode_file: $!";
  my $mode = <$fh> // 'forward';
  close $fh;
  # "close LO HI": closed after a random LO..HI ms (iscsid binds the new socket, sets its
  # parameters, then logs in; a close landing in between hits open-iscsi's reconnect loop).
  if ($mode =~ /^close(?:\s+(\d+)\s+(\d+))?/) {
    my ($lo, $hi) = ($1 // 0, $2 // 0);
    select(undef, undef, undef, ($lo + rand($hi - $lo)) / 1000);
    close $client;
    next;
  }
  my $pid = fork;
  die "fork: $!" unless defined $pid;
  if ($pid) { close $client; next; }
  my $server = IO::Socket::INET->new(PeerAddr => $upstream) or exit 1;
  my $sel = IO::Select->new($client, $server);
  my $buf;
  while (my @ready = $sel->can_read) {
    for my $from (@ready) {
      my $to = $from == $client ? $server : $client;
      my $n = sysread($from, $buf, 262144);
      exit 0 unless $n;
      my $off = 0;
      while ($off < $n) {
        my $w = syswrite($to, $buf, $n - $off, $off);
        exit 0 unless $w;
        $off += $w;
      }
    }
  }
  exit 0;
}
PERL
    echo $! >"$STATE/pid"
    for _ in $(seq 50); do
      ss -ltn "sport = :$2" | grep -q LISTEN && exit 0
      sleep 0.1
    done
    cat "$STATE/log" >&2
    exit 1
    ;;
  close)
    echo "close ${2:-0} ${3:-0}" >"$STATE/mode"
    stop_relays
    ;;
  forward)
    echo forward >"$STATE/mode"
    ;;
  stop)
    stop_relays
    [ -s "$STATE/pid" ] && kill "$(cat "$STATE/pid")" 2>/dev/null || true
    rm -f "$STATE/pid"
    ;;
  *)
    echo "usage: $0 start PORT UPSTREAM | close | forward | stop" >&2
    exit 2
    ;;
esac
