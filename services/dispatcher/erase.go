package dispatcher

import (
	"context"

	"github.com/otpflow/otpflow/events"
)

// Erase is the dispatcher's part of an erasure. The dispatcher keeps nothing that names a
// person: its delivery rows hold challenge ids, providers and scrubbed errors, and the
// address lives only inside the sealed job on OTP_DISPATCH, deleted once sent. So it
// erases nothing and answers with zero rows, which tells the operator it was asked and
// holds nothing.
func (s *Service) Erase(context.Context, events.ErasureRequested) (int64, error) {
	return 0, nil
}
