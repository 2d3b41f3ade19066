package sandbox

import (
	"slices"
	"testing"
)

func TestUngranted(t *testing.T) {
	extra := func(names ...string) []Syscall {
		var s []Syscall
		for _, n := range names {
			s = append(s, Syscall{Name: n, Reason: "r"})
		}
		return s
	}
	tests := []struct {
		name   string
		launch LaunchConfig
		policy Policy
		want   []string
	}{
		{"nothing declared", LaunchConfig{Kind: "hello"}, Policy{Kind: "hello", Syscalls: ProfileFS}, nil},
		{"declared, not granted", LaunchConfig{Kind: "hello"}, Policy{Syscalls: ProfileFS, ExtraSyscalls: extra("sysinfo")}, []string{"sysinfo"}},
		{"declared and granted", LaunchConfig{Kind: "hello", ExtraSyscalls: extra("sysinfo")}, Policy{ExtraSyscalls: extra("sysinfo")}, nil},
		{"one of two granted", LaunchConfig{Kind: "hello", ExtraSyscalls: extra("sysinfo")}, Policy{ExtraSyscalls: extra("sysinfo", "memfd_secret", "memfd_secret")}, []string{"memfd_secret"}},
		{"already in the launch profile", LaunchConfig{Kind: "hello"}, Policy{ExtraSyscalls: extra("read")}, nil},
		{"seccomp off", LaunchConfig{Kind: "hello", Disable: []Layer{LayerSeccomp}}, Policy{ExtraSyscalls: extra("sysinfo")}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.launch.Ungranted(tt.policy); !slices.Equal(got, tt.want) {
				t.Errorf("Ungranted = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestUnusedGrants: a grant (--plugin-syscalls) the plugin's policy does
// not declare is named, once (from review, helper-79: it was accepted
// without a word).
func TestUnusedGrants(t *testing.T) {
	grant := func(names ...string) LaunchConfig {
		c := LaunchConfig{Kind: "hello"}
		for _, n := range names {
			c.ExtraSyscalls = append(c.ExtraSyscalls, Syscall{Name: n, Reason: "granted"})
		}
		return c
	}
	declare := Policy{Kind: "hello", Syscalls: ProfileFS, ExtraSyscalls: []Syscall{{Name: "sysinfo", Reason: "r"}}}
	tests := []struct {
		name   string
		launch LaunchConfig
		want   []string
	}{
		{"no grant", grant(), nil},
		{"granted and declared", grant("sysinfo"), nil},
		{"granted, not declared", grant("sysinfo", "timerfd_create", "timerfd_create"), []string{"timerfd_create"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.launch.UnusedGrants(declare); !slices.Equal(got, tt.want) {
				t.Errorf("UnusedGrants = %v, want %v", got, tt.want)
			}
		})
	}
}
