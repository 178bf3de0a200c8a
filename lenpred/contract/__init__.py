"""The shared contract between the components: the wire codec of lenpred.v1 tensors (`wire`),
the Redis key schema and record (`keys`). Nothing here starts processes or trains anything;
`keys` imports no torch, so the router can depend on it."""
