"""Forward-auth: real nginx, Caddy, Envoy and Traefik with the deploy/forward-auth/ configurations in front of a
recording upstream, asking a real credgate gateway."""
