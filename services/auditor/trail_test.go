package auditor

import (
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
)

func TestSummarizeOperatorAction(t *testing.T) {
	at := time.Date(2026, 11, 26, 10, 2, 0, 0, time.UTC)
	for _, tc := range []struct {
		name string
		ev   events.OperatorAction
		want string
	}{
		{"erase", events.OperatorAction{Action: "audit.erase", Identity: events.OperatorIdentity{User: "alice", Host: "ops-1"},
			Tenant: "_system", Detail: "3 rows", At: at}, "operator alice@ops-1 ran audit.erase: 3 rows"},
		{"with a NATS user", events.OperatorAction{Action: "audit.purge", Identity: events.OperatorIdentity{User: "alice", Host: "ops-1",
			NATSUser: "ops"}, Tenant: "_system", Detail: "0 rows older than 9600h0m0s", At: at},
			"operator alice@ops-1 (NATS user ops) ran audit.purge: 0 rows older than 9600h0m0s"},
		{"no detail", events.OperatorAction{Action: "audit.purge", Identity: events.OperatorIdentity{User: "bo", Host: "h"}},
			"operator bo@h ran audit.purge"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := summarize(string(events.TypeOperatorAction), tc.ev); got != tc.want {
				t.Errorf("summarize = %q, want %q", got, tc.want)
			}
		})
	}
}
