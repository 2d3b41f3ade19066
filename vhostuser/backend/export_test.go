package backend

// SetTestHook sets the function the ring engine calls at points of the
// inflight tracking sequence ("added", "published"), for crash tests.
func SetTestHook(s *Server, f func(point string)) { s.testHook = f }
