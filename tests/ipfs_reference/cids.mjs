// The CIDs the JS UnixFS importer (ipfs-unixfs-importer, as used by Helia) gives
// files, with kubo's `ipfs add --cid-version=1` settings: 262144-byte chunks, raw
// leaves, balanced DAG of at most 174 links per node, CIDv1.
// Usage: node cids.mjs FILE...   prints one JSON object {FILE: CID, ...}
import { createReadStream } from 'node:fs'
import { BlackHoleBlockstore } from 'blockstore-core/black-hole'
import { importer } from 'ipfs-unixfs-importer'
import { fixedSize } from 'ipfs-unixfs-importer/chunker'
import { balanced } from 'ipfs-unixfs-importer/layout'

const options = {
  cidVersion: 1,
  rawLeaves: true,
  reduceSingleLeafToSelf: true,
  chunker: fixedSize({ chunkSize: 262144 }),
  layout: balanced({ maxChildrenPerNode: 174 })
}

const out = {}
for (const path of process.argv.slice(2)) {
  const source = [{ content: createReadStream(path) }]
  for await (const entry of importer(source, new BlackHoleBlockstore(), options)) {
    out[path] = entry.cid.toString()
  }
}
process.stdout.write(JSON.stringify(out) + '\n')
