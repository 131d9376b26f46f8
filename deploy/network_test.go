package deploy

import (
	"net/url"
	"strconv"
	"strings"
	"testing"
)

// networkPolicySpec is the part of a NetworkPolicy's spec the check reads.
type networkPolicySpec struct {
	PodSelector labelSelector `yaml:"podSelector"`
	PolicyTypes []string      `yaml:"policyTypes"`
	Ingress     []policyRule  `yaml:"ingress"`
	Egress      []policyRule  `yaml:"egress"`
}

type labelSelector struct {
	MatchLabels      map[string]string `yaml:"matchLabels"`
	MatchExpressions []struct {
		Key      string
		Operator string
		Values   []string
	} `yaml:"matchExpressions"`
}

// policyRule is an ingress rule (From) or an egress rule (To).
type policyRule struct {
	From  []policyPeer `yaml:"from"`
	To    []policyPeer `yaml:"to"`
	Ports []struct {
		Protocol string
		Port     intOrString
	}
}

type policyPeer struct {
	NamespaceSelector *labelSelector         `yaml:"namespaceSelector"`
	PodSelector       *labelSelector         `yaml:"podSelector"`
	IPBlock           *struct{ CIDR string } `yaml:"ipBlock"`
}

// selects reports whether s selects a pod with labels; the empty selector selects all.
func (s labelSelector) selects(labels map[string]string) bool {
	if len(s.MatchLabels) > 0 && !labelsMatch(s.MatchLabels, labels) {
		return false
	}
	for _, e := range s.MatchExpressions {
		v, ok := labels[e.Key]
		switch e.Operator {
		case "In":
			if !ok || !strings.Contains(","+strings.Join(e.Values, ",")+",", ","+v+",") {
				return false
			}
		case "Exists":
			if !ok {
				return false
			}
		default:
			return false // not read here: count it as selecting nothing
		}
	}
	return true
}

func (s labelSelector) empty() bool { return len(s.MatchLabels) == 0 && len(s.MatchExpressions) == 0 }

// allows reports whether one of rules lets protocol traffic to port reach a peer that
// peer accepts.
func allows(rules []policyRule, protocol, port string, peer func(policyPeer) bool) bool {
	for _, r := range rules {
		peers := append(r.To, r.From...)
		ok := false
		for _, p := range peers {
			ok = ok || peer(p)
		}
		if !ok {
			continue
		}
		for _, p := range r.Ports {
			proto := p.Protocol
			if proto == "" {
				proto = "TCP"
			}
			if proto == protocol && string(p.Port) == port {
				return true
			}
		}
	}
	return false
}

// inNamespace is a peer that selects every pod, or the pods labelled podLabels, of
// namespace ns (by the label Kubernetes puts on every namespace).
func inNamespace(ns string, podLabels map[string]string) func(policyPeer) bool {
	return func(p policyPeer) bool {
		if p.NamespaceSelector == nil || p.IPBlock != nil || !p.NamespaceSelector.selects(map[string]string{"kubernetes.io/metadata.name": ns}) {
			return false
		}
		return p.PodSelector == nil || podLabels != nil && p.PodSelector.selects(podLabels)
	}
}

func outside(p policyPeer) bool { return p.IPBlock != nil }

// TestNetworkPolicies: deploy/k8s denies all traffic to and from the namespace's pods by
// default, and each workload is let out only to what its configuration names — kube-dns,
// the NATS server and PostgreSQL of its URLs (namespace and port) — the dispatcher alone
// out of the cluster, to SES over HTTPS; each service's HTTP port (its /metrics) is
// reachable from the monitoring namespace.
func TestNetworkPolicies(t *testing.T) {
	report(t, checkNetwork(loadFiles(t)))
}

func checkNetwork(f files) []error {
	m, errs := parseManifests(f)
	fail := func(format string, args ...any) { errs = append(errs, errorf(format, args...)) }
	var policies []networkPolicySpec
	denyAll := false
	for name, o := range m.byKind["NetworkPolicy"] {
		p, err := decodeSpec[networkPolicySpec](o)
		if err != nil {
			fail("%s: NetworkPolicy %s: %v", o.file, name, err)
			continue
		}
		policies = append(policies, p)
		types := strings.Join(p.PolicyTypes, ",")
		if p.PodSelector.empty() && strings.Contains(types, "Ingress") && strings.Contains(types, "Egress") && len(p.Ingress) == 0 && len(p.Egress) == 0 {
			denyAll = true
		}
	}
	if !denyAll {
		fail("k8s: no NetworkPolicy denies all ingress and egress of the namespace's pods by default")
	}
	cm := m.byKind["ConfigMap"]["otpflow"]
	if cm == nil {
		return append(errs, errorf("k8s: no ConfigMap otpflow"))
	}
	nats, err := clusterService(cm.Data["OTP_NATS_URL"], "4222")
	if err != nil {
		fail("ConfigMap otpflow: OTP_NATS_URL: %v", err)
	}

	type workload struct {
		name   string
		labels map[string]string
		pod    podSpec
	}
	var workloads []workload
	for _, svc := range services {
		if o := m.byKind["Deployment"][svc]; o != nil {
			if d, err := decodeSpec[deploymentSpec](o); err == nil {
				workloads = append(workloads, workload{"Deployment " + svc, d.Template.Metadata.Labels, d.Template.Spec})
			}
		}
	}
	if o := m.byKind["Job"]["otpflow-provision"]; o != nil {
		if j, err := decodeSpec[jobSpec](o); err == nil {
			workloads = append(workloads, workload{"Job otpflow-provision", j.Template.Metadata.Labels, j.Template.Spec})
		}
	}
	if len(workloads) != len(services)+1 {
		fail("k8s: %d workloads found, want the %d Deployments and the provisioning Job", len(workloads), len(services))
	}
	var pg *serviceAddr
	for _, w := range workloads {
		var egress, ingress []policyRule
		for _, p := range policies {
			if p.PodSelector.selects(w.labels) {
				egress, ingress = append(egress, p.Egress...), append(ingress, p.Ingress...)
			}
		}
		if !allows(egress, "UDP", "53", inNamespace("kube-system", map[string]string{"k8s-app": "kube-dns"})) {
			fail("%s: may not ask kube-dns (UDP 53 in kube-system)", w.name)
		}
		if nats != nil && !allows(egress, "TCP", nats.port, inNamespace(nats.namespace, nil)) {
			fail("%s: may not reach NATS at %s:%s (OTP_NATS_URL)", w.name, nats.namespace, nats.port)
		}
		for _, c := range w.pod.Containers {
			for _, e := range c.Env {
				if e.Name != "OTP_DATABASE_URL" || e.Value == "" {
					continue
				}
				addr, err := clusterService(e.Value, "5432")
				if err != nil {
					fail("%s: OTP_DATABASE_URL: %v", w.name, err)
					continue
				}
				pg = addr
				if !allows(egress, "TCP", addr.port, inNamespace(addr.namespace, nil)) {
					fail("%s: may not reach PostgreSQL at %s:%s (OTP_DATABASE_URL)", w.name, addr.namespace, addr.port)
				}
			}
			if strings.HasPrefix(w.name, "Deployment ") {
				if !allows(ingress, "TCP", "http", inNamespace("monitoring", nil)) {
					fail("%s: its HTTP port (/metrics) is not reachable from the monitoring namespace", w.name)
				}
			}
		}
		leaves := allows(egress, "TCP", "443", outside)
		if w.name == "Deployment dispatcher" && !leaves {
			fail("%s: may not reach SES (TCP 443 outside the cluster)", w.name)
		}
		for _, r := range egress {
			for _, p := range r.To {
				if p.IPBlock != nil && w.name != "Deployment dispatcher" {
					fail("%s: may leave the cluster (ipBlock %s); only the dispatcher does", w.name, p.IPBlock.CIDR)
				}
			}
		}
	}
	if pg == nil {
		fail("k8s: no workload names PostgreSQL in OTP_DATABASE_URL")
	}
	return errs
}

// serviceAddr is a cluster Service's namespace and port.
type serviceAddr struct{ namespace, port string }

// clusterService reads the namespace and port of a URL whose host is a cluster Service
// name (<service>.<namespace>.svc[.cluster.local]); def is the port when it names none.
func clusterService(raw, def string) (*serviceAddr, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, err
	}
	labels := strings.Split(u.Hostname(), ".")
	if len(labels) < 3 || labels[2] != "svc" {
		return nil, errorf("host %q is not <service>.<namespace>.svc…", u.Hostname())
	}
	port := u.Port()
	if port == "" {
		port = def
	}
	if _, err := strconv.Atoi(port); err != nil {
		return nil, errorf("port %q", port)
	}
	return &serviceAddr{namespace: labels[1], port: port}, nil
}
