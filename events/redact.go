package events

import (
	"net/netip"
	"regexp"
	"strings"
	"unicode"
	"unicode/utf8"
)

// RedactedAddress replaces every email address RedactAddresses finds.
const RedactedAddress = "<address>"

// RedactAddresses returns s with everything shaped like an email address replaced by
// RedactedAddress. It is for free text that leaves a service — a failure reason in an
// event, a DLQ header, a log line, a database row — when that text may quote a provider
// ("550 5.1.1 <ana@example.com>: Recipient address rejected"). Recipients live on
// long-lived streams only as keyed hashes; free text must not undo that.
//
// An address is local@domain: the local part is a run of anything but white space,
// control characters and the RFC 5322 specials ()<>[]:;,", or a quoted string; the domain
// is a run of letters, digits, marks and the characters .-_\ (IDNs in either form, even
// escaped by Go's %q or JSON), or an address literal in brackets. Angle brackets around
// an address go with it, so "<ana@example.com>" reads "<address>"; a full stop after the
// domain stays. It errs on the side of hiding: "user=ana@example.com" loses the "user="
// too, and a Message-ID such as "<1234.5678@host>" goes as well. Display names are not
// addresses and stay (otpflow recipients are bare addresses), and so do encoded forms
// such as "ana%40example.com".
//
// Text without '@' comes back unchanged. RedactAddresses is idempotent. Apply it before
// truncating: a cut can leave "ana@" without the domain that makes it an address.
func RedactAddresses(s string) string {
	if strings.IndexByte(s, '@') < 0 {
		return s
	}
	var spans [][2]int // to replace, in order, not overlapping
	for i := 0; i < len(s); {
		r, w := utf8.DecodeRuneInString(s[i:])
		if !inLocal(r) && r != '@' {
			i += w
			continue
		}
		tok, end := i, i // a run of local-part characters and '@'
		for end < len(s) {
			r, w := utf8.DecodeRuneInString(s[end:])
			if !inLocal(r) && r != '@' {
				break
			}
			end += w
		}
		start, stop, ok := findAddress(s, tok, end)
		if !ok {
			i = end
			continue
		}
		if start > 0 && s[start-1] == '<' && stop < len(s) && s[stop] == '>' {
			start, stop = start-1, stop+1
		}
		// A quoted local part can reach back over addresses found before it.
		for len(spans) > 0 && start < spans[len(spans)-1][1] {
			start = min(start, spans[len(spans)-1][0])
			spans = spans[:len(spans)-1]
		}
		spans = append(spans, [2]int{start, stop})
		i = stop
	}
	if len(spans) == 0 {
		return s
	}
	var b strings.Builder
	b.Grow(len(s))
	done := 0
	for _, sp := range spans {
		b.WriteString(s[done:sp[0]])
		b.WriteString(RedactedAddress)
		done = sp[1]
	}
	b.WriteString(s[done:])
	return b.String()
}

// findAddress looks for an address in the run s[tok:end] of local-part characters and '@'
// and returns the span to replace. It takes the last '@' that a domain follows, so
// "a@b@c.d" goes whole.
func findAddress(s string, tok, end int) (start, stop int, ok bool) {
	for at := strings.LastIndexByte(s[tok:end], '@'); at >= 0; at = strings.LastIndexByte(s[tok:tok+at], '@') {
		stop = domainEnd(s, tok+at+1, end)
		if stop == tok+at+1 {
			continue
		}
		if strings.Trim(s[tok:tok+at], "@") != "" {
			return tok, stop, true
		}
		// Nothing but '@' before it: a quoted local part may end right there.
		if tok > 0 && s[tok-1] == '"' {
			return quoteStart(s, tok-1), stop, true
		}
		return 0, 0, false
	}
	return 0, 0, false
}

// domainEnd returns where the domain that starts at s[i] ends, or i if none does: a run of
// domain characters within the token (trailing dots excluded), or, right at the token's
// end, an address literal such as [192.0.2.1] or [IPv6:2001:db8::1]: domain characters
// and colons, at least one. (Nothing else between the brackets, so a literal never
// holds what a first pass wrote: "[<address>]" is not one, and a second pass changes
// nothing.)
func domainEnd(s string, i, tokEnd int) int {
	if i == tokEnd && i < len(s) && s[i] == '[' {
		for j := i + 1; j < len(s); {
			r, w := utf8.DecodeRuneInString(s[j:])
			switch {
			case r == ']' && j > i+1:
				return j + 1
			case !inDomain(r) && r != ':':
				return i
			}
			j += w
		}
		return i
	}
	j := i
	for j < tokEnd {
		r, w := utf8.DecodeRuneInString(s[j:])
		if !inDomain(r) {
			break
		}
		j += w
	}
	for j > i && s[j-1] == '.' {
		j--
	}
	return j
}

// quoteStart returns the index of the quote that opens the quoted string whose closing
// quote is s[closing]; quotes escaped with a backslash do not count. Without an opening
// quote it hides back to the last white space.
func quoteStart(s string, closing int) int {
	for j := closing - 1; j >= 0; j-- {
		if s[j] == '"' && (j == 0 || s[j-1] != '\\') {
			return j
		}
	}
	if sp := strings.LastIndexFunc(s[:closing], unicode.IsSpace); sp >= 0 {
		_, w := utf8.DecodeRuneInString(s[sp:])
		return sp + w
	}
	return 0
}

// inLocal reports whether r may be part of an unquoted local part (RFC 6531 atext and
// dots, generously: anything but space, controls, specials and '@'). Bytes that are not
// UTF-8 count, so they cannot split an address.
func inLocal(r rune) bool {
	switch r {
	case '@', '(', ')', '<', '>', '[', ']', ':', ';', ',', '"':
		return false
	}
	return !unicode.IsSpace(r) && !unicode.IsControl(r)
}

// inDomain reports whether r may be part of a domain name, in ASCII or Unicode form.
func inDomain(r rune) bool {
	switch {
	case r == '.', r == '-', r == '_', r == '\\':
		// A backslash: quoted text (Go's %q, JSON) may escape a character of an IDN.
		return true
	case r < utf8.RuneSelf:
		return 'a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9'
	}
	return unicode.In(r, unicode.L, unicode.M, unicode.N, unicode.Cf) || r == utf8.RuneError
}

// RedactedIP replaces every IP address RedactIPs finds.
const RedactedIP = "<ip>"

// ipRun matches runs that may hold an IP address: hex digits, colons and dots, with an
// IPv6 zone; dottedQuad an IPv4 address within a run.
var (
	ipRun      = regexp.MustCompile(`[0-9A-Fa-f:.]+(?:%[0-9A-Za-z]+)?`)
	dottedQuad = regexp.MustCompile(`[0-9]{1,3}(?:\.[0-9]{1,3}){3}`)
)

// RedactIPs returns s with every IPv4 and IPv6 address replaced by RedactedIP: a client's
// IP is personal data, and free text (a database error quoting a value, a relay's reply
// naming a host) must not carry one onto a long-lived stream. A port after the address
// stays ("<ip>:25"). A run that only looks like an address (a time of day such as
// 10:02:03, a version such as 1.2.3) stays unless it parses as one; a run inside a word
// ("std::string") is not an address.
func RedactIPs(s string) string {
	if !strings.ContainsAny(s, ".:") {
		return s
	}
	var b strings.Builder
	done := 0
	for _, sp := range ipRun.FindAllStringIndex(s, -1) {
		start, end := sp[0], sp[1]
		if start > 0 && isWordByte(s[start-1]) || end < len(s) && isWordByte(s[end]) {
			continue
		}
		run := s[start:end]
		var red string
		switch trimmed := strings.TrimRight(run, ".:"); {
		case isIP(trimmed):
			red = RedactedIP + run[len(trimmed):]
		case strings.Count(trimmed, ":") == 1 && isIP(trimmed[:strings.IndexByte(trimmed, ':')]):
			// An IPv4 address and a port.
			red = RedactedIP + run[strings.IndexByte(run, ':'):]
		default:
			red = dottedQuad.ReplaceAllStringFunc(run, func(q string) string {
				if isIP(q) {
					return RedactedIP
				}
				return q
			})
		}
		if red != run {
			b.WriteString(s[done:start])
			b.WriteString(red)
			done = end
		}
	}
	if done == 0 {
		return s
	}
	b.WriteString(s[done:])
	return b.String()
}

// isIP reports whether s is an IPv4 address, or an IPv6 address written with colons.
func isIP(s string) bool {
	a, err := netip.ParseAddr(s)
	return err == nil && (a.Is4() || strings.Count(s, ":") >= 2)
}

func isWordByte(c byte) bool {
	return c == '_' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}

// Reason is free failure text made fit to leave a service: addresses and IP addresses
// redacted, then cut to at most n bytes on a character boundary (so a database never sees
// a split UTF-8 sequence).
func Reason(s string, n int) string {
	s = RedactIPs(RedactAddresses(s))
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
