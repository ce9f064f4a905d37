from deeprec_env.protocol import ProtocolConfig, answer_text, call_text, parse


def test_written_segments_parse_back():
    p = ProtocolConfig()
    act = parse(call_text("light comedy; 1990s", p, "Thinking."), p)
    assert act.kind == "call" and act.preference == "light comedy; 1990s"
    act = parse(answer_text(["Heat (1995)", "Babe (1995)"], p, "Done."), p)
    assert act.kind == "answer" and act.answer_lines == ("Heat (1995)", "Babe (1995)")
