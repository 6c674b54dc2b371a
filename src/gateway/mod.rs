//! HTTP gateway: routes each request by longest matching `route_prefix` to its application's child.
