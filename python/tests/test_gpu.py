"""vmmpp on a GPU with PyTorch: an elastic cache's K/V through torch.from_dlpack (in place, on the
cache's device), PyTorch streams as stream arguments, memory given back after the stream's work,
sleep and wake keeping the bytes, and a page-locked host tier behind it. Skipped (reported
skipped) without PyTorch or a GPU."""
import unittest

import vmmpp

try:
    import torch
    HAVE_GPU = torch.cuda.is_available()
except ImportError:
    torch = None
    HAVE_GPU = False

GEOMETRY = dict(layers=2, kv_heads=8, head_dim=128, dtype="bf16", block_tokens=16, max_blocks=1024)


@unittest.skipUnless(HAVE_GPU, "needs PyTorch with a CUDA GPU")
class GpuTest(unittest.TestCase):
    def test_torch_reads_and_writes_the_cache_in_place(self):
        stream = torch.cuda.Stream()
        with vmmpp.KVCache(**GEOMETRY, config="elastic") as c, torch.cuda.stream(stream):
            seq = c.add_sequence()
            c.append(seq, 100, stream=stream)
            k = torch.from_dlpack(c.key(1))
            self.assertEqual((k.device.type, tuple(k.shape)), ("cuda", (1024, 16, 8, 128)))
            self.assertEqual(k.dtype, torch.bfloat16)
            slots = torch.tensor(c.slot_mapping(seq), device="cuda")
            k[slots // 16, slots % 16] = torch.arange(100, device="cuda", dtype=torch.bfloat16)[:, None, None]
            block = c.block_table(seq)[2]
            self.assertEqual(k[block].data_ptr(), c.address(1, vmmpp.KEY, block))
            c.sleep(stream=stream)
            self.assertEqual(c.stats()["committed_bytes"], 0)
            c.wake(stream=stream)
            self.assertTrue(torch.equal(k[slots // 16, slots % 16][:, 0, 0].float(),
                                        torch.arange(100, device="cuda").float()))
            c.free(seq, stream=stream)  # a torch.cuda.Stream: its .cuda_stream
            stream.synchronize()
            c.synchronize()
            self.assertEqual(c.stats()["used_blocks"], 0)

    def test_unbacked_blocks_read_as_zeros(self):
        with vmmpp.KVCache(**GEOMETRY, config="elastic", unbacked="zeros") as c:
            k = torch.from_dlpack(c.key(0))
            self.assertEqual(float(k[1000].abs().sum()), 0.0)  # no sequence holds block 1000

    def test_a_pinned_host_tier_behind_a_gpu_cache(self):
        tier_stream = torch.cuda.Stream()
        engine = torch.cuda.current_stream()
        with vmmpp.KVCache(**GEOMETRY, config="elastic") as c, vmmpp.PrefixCache(c) as pc, \
                vmmpp.HostTier(pc, max_blocks=16, stream=tier_stream) as tier:
            seq = c.add_sequence()
            pc.append(seq, 32, stream=engine)
            k = torch.from_dlpack(c.key(0))
            slots = torch.tensor(c.slot_mapping(seq), device="cuda")
            k[slots // 16, slots % 16] = 3.0
            swap_id = tier.swap_out(seq, stream=engine)
            back = tier.swap_in(swap_id, stream=engine)
            slots = torch.tensor(c.slot_mapping(back), device="cuda")
            self.assertTrue(bool((k[slots // 16, slots % 16] == 3.0).all()))
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "stream"):
                vmmpp.HostTier(vmmpp.PrefixCache(vmmpp.KVCache(**GEOMETRY, config="elastic")), max_blocks=4)


if __name__ == "__main__":
    unittest.main()
