"""What carries requests in: RunPod's handler, the local HTTP server, batch files and the client of
a deployed endpoint. Each only turns its wire format into dispatch calls (`Worker.request`,
`Worker.serve`) and the Answer back into its wire format."""
