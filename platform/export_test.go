package platform

// ConnectNATSJudging is connectNATS for tests that must treat a loopback server as remote.
var ConnectNATSJudging = connectNATS
