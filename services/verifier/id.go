package verifier

import (
	"crypto/rand"
	"encoding/hex"
)

// newID returns 16 random bytes in hex: the id of one verify attempt's event.
func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
