"""One policy for many resolvers: the policy as an RPZ zone, served to secondaries or pulled from a primary."""
