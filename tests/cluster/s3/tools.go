//go:build tools

// Package tools pins the S3 server the tests run: versitygw, a real S3 gateway over a POSIX
// folder that honours conditional writes (If-None-Match: *, If-Match).
package tools

import _ "github.com/versity/versitygw/cmd/versitygw"
