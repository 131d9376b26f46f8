package events_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/invopop/jsonschema"
	"github.com/otpflow/otpflow/events"
)

var update = flag.Bool("update", false, "rewrite schema/*.json from the Go types")

// publicPayloads are the payloads other programs read or write, by schema file name.
var publicPayloads = map[string]any{
	"otp.requested":         events.Requested{},
	"otp.verify.request":    events.VerifyRequest{},
	"otp.verify.reply":      events.VerifyReply{},
	"otp.status.request":    events.StatusRequest{},
	"otp.status.reply":      events.StatusReply{},
	"otp.issued":            events.Issued{},
	"otp.rejected":          events.Rejected{},
	"otp.superseded":        events.Superseded{},
	"otp.delivered":         events.Delivered{},
	"otp.delivery_failed":   events.DeliveryFailed{},
	"otp.dispatch_expired":  events.DispatchExpired{},
	"otp.verified":          events.Verified{},
	"otp.verify_failed":     events.VerifyFailed{},
	"otp.locked":            events.Locked{},
	"otp.alert":             events.Alert{},
	"otp.feedback":          events.Feedback{},
	"otp.operator_action":   events.OperatorAction{},
	"otp.erasure_requested": events.ErasureRequested{},
	"otp.erased":            events.Erased{},
	"otp.audit.checkpoint":  events.AuditCheckpoint{},
	// The verifier's own stream, OTP_CHALLENGES.
	"otp.challenge":            events.Challenge{},
	"otp.challenge_superseded": events.Superseded{},
}

func schemaOf(name string, v any) []byte {
	r := &jsonschema.Reflector{DoNotReference: true, ExpandedStruct: true}
	s := r.Reflect(v)
	s.ID = jsonschema.ID("https://otpflow.dev/schema/" + name + ".json")
	s.Title = name
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		panic(err)
	}
	return append(b, '\n')
}

// TestSchemasMatchTypes keeps schema/*.json in step with the Go types: run
// "go test -run TestSchemasMatchTypes -update" after changing a payload.
func TestSchemasMatchTypes(t *testing.T) {
	for name, v := range publicPayloads {
		path := filepath.Join("schema", name+".json")
		want := schemaOf(name, v)
		if *update {
			if err := os.WriteFile(path, want, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%s: %v (run with -update)", path, err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is out of date with the Go type %T; run go test -run TestSchemasMatchTypes -update", path, v)
		}
	}
	// Every event type of the audit stream has a schema.
	for _, typ := range append(slices.Clone(events.EventTypes), events.ChallengeTypes...) {
		if _, ok := publicPayloads[string(typ)]; !ok {
			t.Errorf("no schema for %s", typ)
		}
	}
}

// TestRequestedSchemaRequired checks the schema states the contract's required fields.
func TestRequestedSchemaRequired(t *testing.T) {
	var s struct {
		Required             []string `json:"required"`
		AdditionalProperties *bool    `json:"additionalProperties"`
	}
	if err := json.Unmarshal(schemaOf("otp.requested", events.Requested{}), &s); err != nil {
		t.Fatal(err)
	}
	want := []string{"request_id", "recipient", "purpose"}
	if len(s.Required) != len(want) {
		t.Fatalf("required = %v, want %v", s.Required, want)
	}
	for i := range want {
		if s.Required[i] != want[i] {
			t.Fatalf("required = %v, want %v", s.Required, want)
		}
	}
	if s.AdditionalProperties == nil || *s.AdditionalProperties {
		t.Fatal("otp.requested must forbid additional properties")
	}
}
