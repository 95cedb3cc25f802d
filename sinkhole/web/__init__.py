"""What people see over HTTP: the block page (this package's `blockpage`), and later the web console.

- `certs`: the agency's certificate authority (`sinkhole ca`) and the leaf certificates minted from it,
  one per blocked name, on demand;
- `limits`: the HTTP layer both share: accepting connections on sockets bound before root was dropped,
  caps per address and in all, plain HTTP and TLS on one port, an aiohttp app behind it;
- `blockpage`: the page itself (templates in `templates/`, overridable from /etc/sinkhole/blockpage/).
"""
