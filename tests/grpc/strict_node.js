// strict_node.js — sends the requests of tests/grpc/grpc_test.py's `strict` scenario through
// the Node client library (clients/node/client.js) and prints each call's outcome as JSON.
//
//   NODE_PATH=node_modules node strict_node.js SERVER KEY < cases.json
//   cases.json: [{"method": "ask"|"classify", "req": {...CaseRequest or ClassifyRequest...}}]
//   stdout:     [{"code": "INVALID_ARGUMENT", "details": "..."}, ...]   ("OK" when it succeeded)
//
// JSON carries what a JavaScript string can hold, lone surrogates included ("\ud800"), which
// protobufjs encodes as the bytes ED A0 80: not valid UTF-8, as the server must say.
'use strict';

const path = require('path');
const { connect } = require(path.resolve(__dirname, '..', '..', 'clients', 'node', 'client.js'));
const grpc = require('@grpc/grpc-js');

function statusName(code) {
  const e = Object.entries(grpc.status).find(([, v]) => v === code);
  return e ? e[0] : `UNKNOWN_CODE_${code}`;
}

async function main() {
  const [server, key] = process.argv.slice(2);
  const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));
  const c = connect(server, { key, timeoutMs: 30000 });
  const out = [];
  for (const k of cases) {
    const req = { ...k.req };
    if (req.image) req.image = { data: Buffer.from(req.image.data, 'base64'), media_type: req.image.media_type || '' };
    try {
      const r = await (k.method === 'classify' ? c.classify(req) : c.ask(req));
      out.push({ code: 'OK', case_id: r.case_id });
    } catch (e) {
      out.push({ code: statusName(e.code), details: e.details || e.message });
    }
  }
  c.close();
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((e) => { process.stderr.write(String(e.stack || e) + '\n'); process.exitCode = 2; });
