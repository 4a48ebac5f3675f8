# The ACL policy of discoverd's agents (Consul 1.8 and later). Create it and a token with:
#   consul acl policy create -name discoverd -rules @contrib/consul/discoverd-policy.hcl
#   consul acl token create -description "discoverd agents" -policy-name discoverd
# See docs/deploy.md. Every rule is needed by both roles on a host that runs both; a host that
# only calls services could do with "read" on services.

# Register role: register and deregister the instances of any service with the local agent,
# and pass their TTL checks. Discover role: read every service and its health.
service_prefix "" {
  policy = "write"
}

# Health and catalog reads name the nodes the instances run on.
node_prefix "" {
  policy = "read"
}

# Each agent holds a session; its frontend-port claims are bound to it.
session_prefix "" {
  policy = "write"
}

# The frontend-port claims, below the option consul.kv_prefix ("discoverd" by default).
key_prefix "discoverd/" {
  policy = "write"
}
