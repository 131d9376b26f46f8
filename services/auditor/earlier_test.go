//lint:file-ignore SA1019 writing the deprecated fields, as earlier releases did, is this file's purpose

package auditor

import (
	"fmt"
	"time"

	"github.com/otpflow/otpflow/events"
)

// earlierIssued is an otp.issued as issuers before this release wrote it: the plaintext
// address and client IP, the code HMAC and the session.
func earlierIssued(i int) events.Issued {
	return events.Issued{ChallengeID: fmt.Sprintf("c-%d", i), Tenant: "acme", RequestID: fmt.Sprintf("r-%d", i), CodeSeq: 1,
		Recipient: "Ana.Lima@Example.com", Purpose: "login", CodeHMAC: []byte{1, 2}, PepperKeyID: "p1", MaxAttempts: 5,
		SessionID: "s-1", ClientIP: fmt.Sprintf("203.0.113.%d", i), IssuedAt: time.Now().UTC(), ExpiresAt: time.Now().Add(time.Minute).UTC()}
}
