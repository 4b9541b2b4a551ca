// Command coredns is CoreDNS with only the plugins radfm's real-node tests use: cluster DNS for
// Services and the hostname/subdomain records of pods behind headless Services. Built the way
// CoreDNS documents for a custom plugin set (its coremain with a chosen directive list), so the
// dozens of cloud DNS providers of the full binary are neither downloaded nor compiled.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	// The order in which the plugins handle a query (a subset of CoreDNS's plugin.cfg order).
	dnsserver.Directives = []string{"errors", "log", "health", "ready", "cache", "kubernetes"}
}

func main() {
	coremain.Run()
}
