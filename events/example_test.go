package events_test

import (
	"errors"
	"fmt"

	"github.com/otpflow/otpflow/events"
)

func ExampleDecodeRequested() {
	_, err := events.DecodeRequested([]byte(`{"request_id":"r1","recipient":"ana@example.com\r\nBcc: x@y.z","purpose":"login"}`))
	var ve *events.ValidationError
	if errors.As(err, &ve) {
		fmt.Println(ve.Reason, ve.Field)
	}
	// Output: header_injection recipient
}

func ExampleNewMsg() {
	m, _ := events.NewMsg(events.TypeIssued, "acme", "issued:c1:1", "c1", events.Issued{ChallengeID: "c1"}, events.Envelope{Source: "otpflow/issuer"})
	fmt.Println(m.Subject, m.Header.Get("Nats-Msg-Id"), m.Header.Get(events.HeaderID), m.Header.Get(events.HeaderType))
	// Output: otp.issued.acme issued:c1:1 issued:c1:1 otp.issued
}
