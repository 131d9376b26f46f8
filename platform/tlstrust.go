package platform

import (
	"crypto/x509"
	"errors"
	"fmt"
)

// ExplainTLS adds to a connection error, when the TLS handshake could not verify the
// server, what to fix: which trust setting was used and what it did not accept. Other
// errors pass unchanged.
func ExplainTLS(err error, trust string) error {
	var unknown x509.UnknownAuthorityError
	var host x509.HostnameError
	var invalid x509.CertificateInvalidError
	switch {
	case errors.As(err, &unknown):
		return fmt.Errorf("%w; the server's certificate is not signed by %s", err, trust)
	case errors.As(err, &host):
		return fmt.Errorf("%w; the server's certificate does not name the host in the URL", err)
	case errors.As(err, &invalid):
		return fmt.Errorf("%w; the server's certificate is not valid now or not for a server", err)
	}
	return err
}
