package auditor

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"fmt"

	"github.com/otpflow/otpflow/platform/keys"
)

// Chain holds the chain key ring (OTP_AUDIT_CHAIN_KEY): every row hash is an HMAC under one
// of its keys, so whoever can write the audit tables but does not hold the key can neither
// recompute a hash after an edit nor make up a purge checkpoint. The database never sees
// the key; each row names the id of the key it was hashed with, so the chain verifies
// across a rotation as long as the ring still holds the old keys.
type Chain struct{ ring *keys.Ring }

// ParseChainKey reads a chain key ring: "base64" or "id:base64,…" (first active), each key at
// least 32 bytes.
func ParseChainKey(value string) (*Chain, error) {
	r, err := keys.Parse(value, 32, 0)
	if err != nil {
		return nil, err
	}
	return &Chain{ring: r}, nil
}

// KeyID is the id of the key new rows are hashed with.
func (c *Chain) KeyID() string { return c.ring.ActiveID() }

func (c *Chain) key(id string) ([]byte, error) {
	if k := c.ring.Key(id); k != nil {
		return k, nil
	}
	return nil, fmt.Errorf("chain key %q: %w", id, keys.ErrUnknownKey)
}

// checkpointMAC authenticates a purge checkpoint row (the last purged position and hash).
func (c *Chain) checkpointMAC(id string, pos int64, hash []byte) ([]byte, error) {
	k, err := c.key(id)
	if err != nil {
		return nil, err
	}
	m := hmac.New(sha256.New, k)
	m.Write([]byte("otpflow-audit-purge-checkpoint\x00"))
	m.Write(binary.BigEndian.AppendUint64(nil, uint64(pos)))
	m.Write(hash)
	return m.Sum(nil), nil
}
