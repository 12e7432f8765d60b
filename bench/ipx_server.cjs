// The ipx peer of the benchmark: ipx (sharp) over a folder, on a loopback port.
//   IPX_DIR=<folder> PORT=<port> NODE_PATH=<node_modules> node bench/ipx_server.cjs
"use strict";

const http = require("node:http");
const { createIPX, ipxFSStorage, createIPXNodeServer } = require("ipx");

const ipx = createIPX({ storage: ipxFSStorage({ dir: process.env.IPX_DIR }) });
const server = http.createServer(createIPXNodeServer(ipx));
server.keepAliveTimeout = 65000;
server.listen(Number(process.env.PORT), "127.0.0.1");

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}
