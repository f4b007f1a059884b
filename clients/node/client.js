#!/usr/bin/env node
// Node.js client of medmoe-router's gRPC front door (proto/medmoe.proto,
// medmoe.v1.CaseService), on @grpc/grpc-js + @grpc/proto-loader (npm ci).
//
//   const { connect } = require('./client.js');
//   const c = connect('127.0.0.1:50051', { key: API_KEY });
//   const ans = await c.ask({ question: 'What modality is this image?',
//                             image: { data: fs.readFileSync('case.png') } });
//   c.close();
//
// Command line (same shape as the C `medmoe` CLI; exit 1 with "medmoe: STATUS: message"):
//   node client.js ask|classify|status --server HOST:PORT --key KEY [--image F]
//        --question Q [--candidates a,b,c] [--stream] [--json] [--tls-ca F ...]
//        [--media-type T] [--window auto|full|lung|mediastinum|bone|brain] [--frame N]
//
// DICOM: image: { data, media_type: 'application/dicom', dicom: { window: 'lung', frame: 0 } }
// (window: '' = the file's, or a CT preset; frame: 1-based, 0 = the middle frame). A file
// whose name ends in .dcm is sent as application/dicom unless --media-type says otherwise.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.resolve(__dirname, '..', '..', 'proto');

// keepCase: the .proto field names (case_id, not caseId), as the other clients print them.
const LOAD_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
                       includeDirs: [PROTO_DIR] };

function loadPackages() {
  const def = protoLoader.loadSync(['medmoe.proto', 'health.proto'], LOAD_OPTIONS);
  const pkg = grpc.loadPackageDefinition(def);
  return { CaseService: pkg.medmoe.v1.CaseService, Health: pkg.grpc.health.v1.Health };
}

// opts: { key, tls: { ca, cert, key } (file paths; {} = system roots), timeoutMs }
function connect(target, opts = {}) {
  const { CaseService, Health } = loadPackages();
  let creds;
  if (opts.tls) {
    const rd = (f) => (f ? fs.readFileSync(f) : null);
    creds = grpc.credentials.createSsl(rd(opts.tls.ca), rd(opts.tls.key), rd(opts.tls.cert));
  } else {
    creds = grpc.credentials.createInsecure();
  }
  const chOpts = { 'grpc.max_send_message_length': -1, 'grpc.max_receive_message_length': -1 };
  const svc = new CaseService(target, creds, chOpts);
  const health = new Health(target, creds, chOpts);
  const md = () => {
    const m = new grpc.Metadata();
    if (opts.key) m.set('authorization', 'Bearer ' + opts.key);
    return m;
  };
  const callOpts = () => (opts.timeoutMs ? { deadline: Date.now() + opts.timeoutMs } : {});
  const unary = (client, method, req) =>
    new Promise((resolve, reject) => {
      client[method](req, md(), callOpts(), (err, resp) => (err ? reject(err) : resolve(resp)));
    });
  return {
    ask: (req) => unary(svc, 'Ask', req),
    // The call object (an EventEmitter: 'data' per AnswerChunk, 'error', 'end'); .cancel().
    askStream: (req) => svc.AskStream(req, md(), callOpts()),
    classify: (req) => unary(svc, 'Classify', req),
    serverInfo: () => unary(svc, 'GetServerInfo', {}),
    health: (service = '') => unary(health, 'Check', { service }).then((r) => r.status),
    close: () => { svc.close(); health.close(); },
  };
}

function parseArgs(argv) {
  const flags = { stream: false, json: false };
  const withValue = new Set(['server', 'key', 'image', 'media-type', 'question', 'candidates',
                             'max-tokens', 'temperature', 'top-p', 'seed', 'conv-mode', 'case-id',
                             'timeout-ms', 'tls-ca', 'tls-cert', 'tls-key', 'window', 'frame']);
  const cmd = argv[0];
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument '${a}'`);
    const name = a.slice(2);
    if (name === 'stream' || name === 'json') flags[name] = true;
    else if (withValue.has(name)) {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      flags[name] = argv[++i];
    } else throw new Error(`unknown flag ${a}`);
  }
  if (!['ask', 'classify', 'status'].includes(cmd)) throw new Error('command: ask, classify or status');
  if (!flags.server) throw new Error('--server HOST:PORT is required');
  if (cmd !== 'status' && !flags.question) throw new Error('--question is required');
  if (cmd === 'classify' && !flags.candidates) throw new Error('--candidates is required');
  return { cmd, flags };
}

function statusName(code) {
  const e = Object.entries(grpc.status).find(([, v]) => v === code);
  return e ? e[0] : `UNKNOWN_CODE_${code}`;
}

async function main(argv) {
  let args;
  try {
    args = parseArgs(argv);
  } catch (e) {
    process.stderr.write(`medmoe: ${e.message}\n`);
    return 2;
  }
  const f = args.flags;
  const tls = f['tls-ca'] || f['tls-cert'] || f['tls-key']
    ? { ca: f['tls-ca'], cert: f['tls-cert'], key: f['tls-key'] } : null;
  const c = connect(f.server, { key: f.key || process.env.MEDMOE_API_KEY, tls,
                                timeoutMs: f['timeout-ms'] ? Number(f['timeout-ms']) : 0 });
  let image = null;
  if (f.image) {
    const dcm = /\.dcm$/i.test(f.image);
    image = { data: fs.readFileSync(f.image),
              media_type: f['media-type'] || (dcm ? 'application/dicom' : '') };
    if (f.window || f.frame) image.dicom = { window: f.window || '', frame: Number(f.frame || 0) };
  }
  const base = { case_id: f['case-id'] || '', question: f.question || '', conv_mode: f['conv-mode'] || '' };
  if (image) base.image = image;
  const out = (o) => process.stdout.write(JSON.stringify(o, null, 1) + '\n');
  try {
    if (args.cmd === 'ask') {
      const req = { ...base, options: { max_tokens: Number(f['max-tokens'] || 0),
                                        temperature: Number(f.temperature || 0),
                                        top_p: Number(f['top-p'] || 0), seed: String(f.seed || '0') } };
      if (f.stream) {
        const final = await new Promise((resolve, reject) => {
          let last = null;
          const call = c.askStream(req);
          call.on('data', (ch) => {
            if (!f.json && ch.text) process.stdout.write(ch.text);
            if (ch.final) last = ch.final;
          });
          call.on('error', reject);
          call.on('end', () => resolve(last));
        });
        if (!final) throw Object.assign(new Error('the stream ended without a final chunk'),
                                        { code: grpc.status.INTERNAL, details: 'no final chunk' });
        if (f.json) out(final); else process.stdout.write('\n');
      } else {
        const ans = await c.ask(req);
        if (f.json) out(ans); else process.stdout.write(ans.answer + '\n');
      }
    } else if (args.cmd === 'classify') {
      const r = await c.classify({ ...base, candidates: f.candidates.split(',') });
      if (f.json) out(r);
      else for (const x of r.candidates)
        process.stdout.write(`${x.text.padEnd(24)} p=${x.prob.toFixed(4)}  logprob=${x.logprob.toFixed(4)}\n`);
    } else {
      const info = await c.serverInfo();
      const h = await c.health('');
      const hs = await c.health('medmoe.v1.CaseService');
      if (f.json) out({ server_info: info, health: h, health_case_service: hs });
      else process.stdout.write(`version: ${info.version}\nmodel: ${info.model}\nhealth: ${h} (${hs})\n`);
    }
  } catch (e) {
    process.stderr.write(`medmoe: ${statusName(e.code)}: ${e.details || e.message}\n`);
    return 1;
  } finally {
    c.close();
  }
  return 0;
}

module.exports = { connect, loadPackages };

if (require.main === module) {
  main(process.argv.slice(2)).then((rc) => { process.exitCode = rc; });
}
