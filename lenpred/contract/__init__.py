"""The shared contract between the components: the wire codec of lenpred.v1 tensors (`wire`),
the Redis key schema (`keys`), the one prediction type and its estimate arithmetic (`prediction`),
Redis connection settings (`redisconf`). Nothing here starts processes or trains anything; only
`wire` imports torch (the tap and sidecar side), so the router can depend on the rest."""
