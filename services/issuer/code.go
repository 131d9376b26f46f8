package issuer

import (
	"crypto/rand"
	"math/big"
)

// newCode returns length characters drawn uniformly and independently from alphabet
// with crypto/rand. rand.Int samples by rejection, so there is no modulo bias.
func newCode(length int, alphabet string) (string, error) {
	chars := []rune(alphabet)
	n := big.NewInt(int64(len(chars)))
	out := make([]rune, length)
	for i := range out {
		k, err := rand.Int(rand.Reader, n)
		if err != nil {
			return "", err
		}
		out[i] = chars[k.Int64()]
	}
	return string(out), nil
}

// newID returns a random UUID (version 4).
func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	const hex = "0123456789abcdef"
	out := make([]byte, 0, 36)
	for i, c := range b {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			out = append(out, '-')
		}
		out = append(out, hex[c>>4], hex[c&0x0f])
	}
	return string(out)
}
