// The header used from C++17 through RAII wrappers: handles owned by
// unique_ptr with the library's _free functions, errors as exceptions.
// One attention and one FFN rank run on two threads of this process.
#include <afmesh.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace afm {

struct Error : std::runtime_error {
    afmesh_result code;
    Error(afmesh_result c, const std::string &what)
        : std::runtime_error(what + ": " + afmesh_result_str(c) + ": " + afmesh_last_error_message()), code(c) {}
};

inline void check(afmesh_result r, const char *what) {
    if (r != AFMESH_OK) throw Error(r, what);
}

struct AttentionFree { void operator()(afmesh_attention *a) const { afmesh_attention_free(a); } };
struct FfnFree { void operator()(afmesh_ffn *f) const { afmesh_ffn_free(f); } };
struct BatchFree { void operator()(afmesh_batch *b) const { afmesh_batch_free(b); } };

class Attention {
  public:
    Attention(const afmesh_config &cfg, const afmesh_stage_spec &spec) {
        afmesh_attention *a = nullptr;
        check(afmesh_attention_new(&cfg, &spec, &a), "afmesh_attention_new");
        h_.reset(a);
    }
    afmesh_dispatch dispatch(uint32_t stage, const std::vector<float> &rows) {
        afmesh_dispatch d{};
        check(afmesh_attention_dispatch(h_.get(), stage, rows.data(), rows.size() * sizeof(float), nullptr, 0, &d),
              "dispatch");
        return d;
    }
    std::vector<float> sum(afmesh_dispatch d, size_t floats) {
        std::vector<float> out(floats);
        check(afmesh_attention_wait_combine_sum(h_.get(), d, AFMESH_DTYPE_F32, 10000, out.data(),
                                                floats * sizeof(float)),
              "wait_combine_sum");
        return out;
    }
    void finalize() { check(afmesh_attention_finalize(h_.get()), "finalize"); }

  private:
    std::unique_ptr<afmesh_attention, AttentionFree> h_;
};

class Ffn {
  public:
    Ffn(const afmesh_config &cfg, const afmesh_stage_spec &spec) {
        afmesh_ffn *f = nullptr;
        check(afmesh_ffn_new(&cfg, &spec, &f), "afmesh_ffn_new");
        h_.reset(f);
    }
    // Answers one batch with every value doubled.
    void serve_one() {
        afmesh_batch *raw = nullptr;
        check(afmesh_ffn_get_batch(h_.get(), 10000, &raw), "get_batch");
        std::unique_ptr<afmesh_batch, BatchFree> b(raw);
        afmesh_batch_meta meta{};
        check(afmesh_batch_info(b.get(), &meta), "batch_info");
        std::vector<std::vector<float>> outs(meta.senders);
        std::vector<const void *> ptrs;
        std::vector<size_t> lens;
        for (uint32_t a = 0; a < meta.senders; a++) {
            afmesh_sender_view v{};
            check(afmesh_batch_sender(b.get(), a, &v), "batch_sender");
            const float *in = static_cast<const float *>(v.tokens);
            size_t n = v.token_count * v.row_bytes / sizeof(float);
            outs[a].assign(in, in + n);
            for (float &x : outs[a]) x *= 2.0f;
            ptrs.push_back(outs[a].data());
            lens.push_back(n * sizeof(float));
        }
        check(afmesh_ffn_respond(h_.get(), b.get(), ptrs.data(), lens.data(), ptrs.size()), "respond");
    }
    void finalize() { check(afmesh_ffn_finalize(h_.get()), "finalize"); }

  private:
    std::unique_ptr<afmesh_ffn, FfnFree> h_;
};

}  // namespace afm

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s HOST:PORT\n", argv[0]);
        return 2;
    }
    afmesh_config cfg = AFMESH_CONFIG_INIT;
    cfg.scheduler = argv[1];
    cfg.num_attention = 1;
    cfg.num_ffn = 1;
    cfg.setup_timeout_ms = 20000;
    afmesh_stage_spec spec{1, 4, 16, 16, 0};
    const int layers = 10;
    std::string ffn_error;
    std::thread ffn([&] {
        try {
            afm::Ffn f(cfg, spec);
            for (int i = 0; i < layers; i++) f.serve_one();
            f.finalize();
        } catch (const std::exception &e) {
            ffn_error = e.what();
        }
    });
    int rc = 0;
    try {
        afmesh_config acfg = cfg;
        acfg.embed_scheduler = 1;
        afm::Attention a(acfg, spec);
        for (int l = 0; l < layers; l++) {
            std::vector<float> rows(4 * 4);
            for (size_t i = 0; i < rows.size(); i++) rows[i] = float(l * 100 + int(i));
            auto d = a.dispatch(0, rows);
            auto s = a.sum(d, rows.size());
            for (size_t i = 0; i < rows.size(); i++)
                if (s[i] != rows[i] * 2.0f) throw std::runtime_error("wrong sum");
        }
        // An error surfaces as an exception with the library's message.
        try {
            a.dispatch(0, std::vector<float>(5));  // not a whole row
            rc = 1;
        } catch (const afm::Error &e) {
            if (e.code != AFMESH_ERR_BUFFER_SIZE) rc = 1;
        }
        a.finalize();
    } catch (const std::exception &e) {
        std::fprintf(stderr, "attention: %s\n", e.what());
        rc = 1;
    }
    ffn.join();
    if (!ffn_error.empty()) {
        std::fprintf(stderr, "ffn: %s\n", ffn_error.c_str());
        rc = 1;
    }
    if (rc == 0) std::printf("c++ ok\n");
    return rc;
}
