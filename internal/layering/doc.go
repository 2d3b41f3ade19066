// Package layering holds no code: its test checks the import rules of
// docs/ARCHITECTURE.md ("Layers") with go list, so that a change that
// breaks them fails `go test ./...`.
package layering
